r"""One VTAB-1k task, trained on train800val200 and tested on test.

Uses the per-task settings we know (vpt_jax/protocol/hparams.py): VPT-deep's
prompt length per task and, for DMLab, EuroSAT, SUN397 and SVHN, VPT-deep's
complete settings. Example (VPT-deep on DMLab, as VPT's demo):

  python run.py --workdir /tmp/dmlab --config configs/vtab.py:task=dmlab \
    --config.model.init_checkpoint=/data/ViT-B_16.npz \
    --config.data.data_dir=~/tensorflow_datasets

``path=DIR`` reads the extracted VTAB-1k folder (DIR/<task>/train800val200.txt,
...) instead of TFDS. To tune lr and weight decay as the papers do, use
configs/vtab_protocol.py.
"""

from configs import common
from vpt_jax.data import vtab_tasks
from vpt_jax.protocol import hparams


def get_config(arg: str = ""):
  args = common.parse_arg(arg, task="dmlab", **common.DATA_ARGS, **common.MODEL_ARGS)
  task = vtab_tasks.get_task(args.task)
  config = common.model_config(args)
  config.data.task = f"vtab/{task.name}"
  config.data.train_split = "train800val200"
  config.data.eval_split = ""
  config.data.test_split = "test"
  known = hparams.VPT_DEEP_KNOWN.get(task.name)
  given = common.given_prompts(args)
  if config.method == "vpt_deep" and given is None:
    config.prompt.num_prompts = hparams.vpt_deep_prompts(task.name) or config.prompt.num_prompts
  if config.method == "vpt_deep" and known and not args.runlocal:
    config.prompt.num_prompts = known["num_prompts"] if given is None else given
    config.prompt.dropout = known["dropout"]
    config.optim.batch_size = known["batch_size"]
    config.optim.base_lr = known["base_lr"]
    config.optim.weight_decay = known["weight_decay"]
  config.lock()
  return config
