r"""The papers' VTAB-1k (or FGVC) protocol for one method, as one command.

Grid over base lr x weight decay on train800 -> val200 (last epoch), pick the
best (ties to the smaller lr), retrain on train800val200 with seeds 42, 44,
82, 100, 800, report test top-1 mean and std (vpt_jax/protocol/tuning.py).

  python run.py --workdir /results/vpt_deep \
    --config configs/vtab_protocol.py:method=vpt_deep,tasks=dmlab+eurosat \
    --config.model.init_checkpoint=/data/ViT-B_16.npz \
    --config.data.data_dir=~/tensorflow_datasets

tasks: "all", a group (natural, specialized, structured), VTAB task names,
"fgvc/<dataset>" or "fgvc/all", or "tfds:<builder>" (then set the
protocol.*_split fields), joined by "+". Spread the runs over n jobs with
--config.protocol.shard=i/n (i = 0..n-1); rerunning a command skips finished
runs. Read the results with python -m vpt_jax.protocol.report WORKDIR.
--config.protocol.fuse_settings=8 trains 8 grid points of a task in one
compiled program (same results, the backbone read once per step for all).

path=DIR reads files instead of TFDS: for VTAB tasks the extracted VTAB-1k
folder (DIR/<task>/train800.txt, ...), for FGVC tasks VPT's split files in
DIR/<dataset>/ (cub, nabirds, oxford_flowers, stanford_dogs, stanford_cars).
"""

import ml_collections

from configs import common
from vpt_jax.protocol import hparams


def get_config(arg: str = ""):
  args = common.parse_arg(arg, tasks="all", name="", shard="0/1",
                          **common.DATA_ARGS, **common.MODEL_ARGS)
  config = common.model_config(args)
  config.protocol = ml_collections.ConfigDict(dict(
      tasks=args.tasks,
      # Column label in the report ("" = the method), e.g. vpt_deep_p10.
      name=args.name,
      # Base lrs and weight decays, descending ((): the reference's grids).
      lrs=(), weight_decays=(),
      seeds=hparams.FINAL_SEEDS,
      shard=args.shard,
      # VPT-deep: the per-task prompt lengths of hparams.VPT_DEEP_PROMPTS
      # (unless num_prompts is given).
      per_task_prompts=common.given_prompts(args) is None,
      # "" = the benchmark's own (VTAB: train800, val200, train800val200, test;
      # FGVC: train, val, train, test).
      tune_train_split="", tune_eval_split="", final_train_split="", final_test_split="",
      # Grid points of a task trained together in one compiled program on the
      # shared frozen backbone (vpt_jax/training/sweeps.py); 0 = one by one.
      fuse_settings=0,
  ))
  if args.runlocal:  # one grid point and one seed
    config.protocol.lrs = (1.0,)
    config.protocol.weight_decays = (1e-3,)
    config.protocol.seeds = (42,)
  config.lock()
  return config
