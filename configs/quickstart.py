r"""The offline quickstart: transfer from the shipped sprites-pretrained ViT.

  python run.py --config configs/quickstart.py --workdir /tmp/vpt_quickstart
  python run.py --config configs/quickstart.py:ci --workdir /tmp/qs   # a 1-minute smoke run
  vpt-jax --config vpt_jax:quickstart --workdir /tmp/vpt_quickstart    # installed, anywhere

Three downstream tasks with 1,000 training images each (VTAB-1k style): two
held-out structured attributes of multi-sprite scenes (object count; the
vertical position of the lowest object, a CLEVR-distance analogue) and the
handwritten digits that ship with scikit-learn (out of domain). Five runs per
task: VPT-deep, VPT-shallow, linear probe, full fine-tuning and the same ViT
trained from scratch. Hyper-parameters were chosen on these tasks' validation
splits (see README), not on their test splits.
"""

import os

import ml_collections

from configs import common

# configs/ and assets/ are siblings both in a checkout (the repository root) and
# installed (site-packages/vpt_jax/, see pyproject.toml), so this finds the backbone
# from any working directory.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg: str = ""):
  args = common.parse_arg(arg, ci=False)
  suite = ml_collections.ConfigDict()
  suite.suite = "quickstart"
  suite.backbone = os.path.join(ROOT, "assets", "sprites_vit_nano8.npz")
  suite.workers = 2  # processes; each trains its runs on one core
  suite.task_order = ("count", "lowest_y", "digits")
  suite.run_order = ("vpt_deep", "vpt_shallow", "linear", "full", "scratch")

  base = common.base_config()
  base.model.variant = "nano/8"
  base.model.image_size = 32
  base.prompt.num_prompts = 10
  base.prompt.dropout = 0.0
  base.data.normalization = "minus_one_to_one"  # as the backbone was pretrained
  base.optim.batch_size = 64
  base.optim.epochs = 15
  base.optim.warmup_epochs = 1.5
  base.optim.schedule_unit = "step"
  base.optim.weight_decay = 0.0
  base.eval.batch_size = 500
  base.checkpoint.every_steps = 1000
  base.log_every_steps = 50
  suite.base = base

  scene_task = lambda label: ml_collections.ConfigDict(dict(
      builder="vpt_sprites/scenes", label_key=label,
      train_split="train[:800]+validation[:200]", test_split="test"))
  suite.tasks = ml_collections.ConfigDict({
      "count": scene_task("count"),
      "lowest_y": scene_task("lowest_y_bin"),
      "digits": dict(builder="vpt_digits", label_key="label", train_split="train",
                     test_split="test"),
  })

  def run(method, pretrained=True, **overrides):
    return ml_collections.ConfigDict(dict(
        method=method, pretrained=pretrained, overrides=tuple(overrides.items())))
  adamw = {"optim.weight_decay": 1e-4}  # any non-zero decay selects the reference AdamW
  suite.runs = ml_collections.ConfigDict({
      "vpt_deep": run("vpt_deep", **{"optim.base_lr": 0.4}),
      "vpt_shallow": run("vpt_shallow", **{"optim.base_lr": 0.4}),
      "linear": run("linear", **{"optim.base_lr": 2.0}),
      "full": run("full", **{"optim.base_lr": 4e-3}, **adamw),
      "scratch": run("full", pretrained=False, **{"optim.base_lr": 1.2e-2}, **adamw),
  })
  if args.ci:
    base.optim.epochs = 2
    base.optim.warmup_epochs = 0.5
    for task in suite.tasks.values():
      task.test_split = "test[:200]"
    suite.task_order = ("count",)
  suite.lock()
  return suite
