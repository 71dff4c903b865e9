"""The protocol's plan: which runs there are, their folders and their single-run configs.

For each task: a grid over base learning rate x weight decay (the reference's
grid for the method, ``hparams``), trained on the tune split and scored on the
tune eval split, then final runs with the protocol's seeds on the final splits.
``plan`` lists every run in a fixed order (``protocol.shard`` splits it
between jobs); ``run_config`` turns one into an ordinary training config.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Optional

import ml_collections

from vpt_jax import errors
from vpt_jax.methods import registry
from vpt_jax.protocol import hparams

# Split names per benchmark: (tune train, tune eval, final train, final test).
DEFAULT_SPLITS = {
    "vtab": ("train800", "val200", "train800val200", "test"),
    "fgvc": ("train", "val", "train", "test"),
}


class ProtocolError(errors.UserError):
  """A protocol config or results folder that cannot be used; names the fix."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of the protocol.

  Attributes:
    task: "vtab/<task>", "fgvc/<dataset>" or "tfds:<builder>".
    phase: "tune" or "final".
    lr, weight_decay: the base lr and weight decay (for a final run: the
      selected ones, filled in once the grid is finished).
    seed: the run's seed.
  """
  task: str
  phase: str
  lr: Optional[float] = None
  weight_decay: Optional[float] = None
  seed: int = 42

  def folder(self, name: str) -> str:
    """The run's folder below the protocol's workdir."""
    base = os.path.join(task_folder(self.task), name)
    if self.phase == "tune":
      return os.path.join(base, "tune", f"lr{self.lr:g}_wd{self.weight_decay:g}")
    return os.path.join(base, "final", f"seed{self.seed}")


def task_folder(task: str) -> str:
  """"vtab/dmlab" -> "vtab/dmlab"; "tfds:vpt_sprites/tiny" -> "tfds/vpt_sprites_tiny"."""
  if task.startswith("tfds:"):
    return os.path.join("tfds", task[len("tfds:"):].replace("/", "_").replace(":", "_"))
  return task


def benchmark(task: str) -> str:
  return task.split("/")[0] if task.startswith(("vtab/", "fgvc/")) else "custom"


def parse_tasks(spec: str) -> list[str]:
  """"dmlab+eurosat", "all", "structured", "fgvc/cub+tfds:vpt_sprites/tiny" -> tasks.

  Bare names are VTAB tasks (or groups, or "all"); "fgvc/all" is the five FGVC
  datasets.
  """
  from vpt_jax.data import fgvc  # pylint: disable=g-import-not-at-top
  from vpt_jax.data import vtab_tasks  # pylint: disable=g-import-not-at-top
  tasks = []
  for item in filter(None, spec.split("+")):
    if item.startswith("tfds:"):
      tasks.append(item)
    elif item.startswith("fgvc/"):
      name = item[len("fgvc/"):]
      names = list(fgvc.DATASETS) if name == "all" else [fgvc.get_dataset(name).name]
      tasks.extend(f"fgvc/{n}" for n in names)
    else:
      item = item[len("vtab/"):] if item.startswith("vtab/") else item
      tasks.extend(f"vtab/{n}" for n in vtab_tasks.task_names(item))
  if not tasks:
    raise ProtocolError("protocol.tasks is empty; e.g. tasks=dmlab+eurosat, all, "
                        "structured or fgvc/cub")
  return list(dict.fromkeys(tasks))


def parse_shard(shard: str) -> tuple[int, int]:
  index, _, count = shard.partition("/")
  try:
    index, count = int(index), int(count)
  except ValueError:
    index, count = -1, 0
  if not 0 <= index < count:
    raise ProtocolError(f"protocol.shard {shard!r} must be 'i/n' with 0 <= i < n, "
                        "e.g. 0/4 for the first of four jobs")
  return index, count


def method_name(config) -> str:
  return config.protocol.name or config.method


def grid(config, task: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(base lrs, weight decays) in the reference's visiting order (descending)."""
  method = registry.get_method(config.method)
  optimizer = config.optim.name or method.optimizer
  lrs = tuple(config.protocol.lrs) or hparams.lr_grid(config.method, optimizer,
                                                     benchmark(task))
  wds = tuple(config.protocol.weight_decays) or hparams.weight_decay_grid(config.method)
  return tuple(float(x) for x in lrs), tuple(float(x) for x in wds)


def plan(config) -> list[RunSpec]:
  """Every run of the protocol, in the fixed order sharding is defined on."""
  runs = []
  for task in parse_tasks(config.protocol.tasks):
    lrs, wds = grid(config, task)
    runs += [RunSpec(task, "tune", lr, wd, config.seed) for lr in lrs for wd in wds]
    runs += [RunSpec(task, "final", seed=int(seed)) for seed in config.protocol.seeds]
  return runs


def splits(config, task: str) -> tuple[str, str, str, str]:
  """(tune train, tune eval, final train, final test) split names for a task."""
  given = (config.protocol.tune_train_split, config.protocol.tune_eval_split,
           config.protocol.final_train_split, config.protocol.final_test_split)
  defaults = DEFAULT_SPLITS.get(benchmark(task))
  if defaults is None and not all(given):
    raise ProtocolError(f"task {task} is no VTAB or FGVC task: set protocol."
                        "tune_train_split, tune_eval_split, final_train_split and "
                        "final_test_split")
  return tuple(g or d for g, d in zip(given, defaults or given))


def run_config(config, spec: RunSpec) -> ml_collections.ConfigDict:
  """The single-run config of one protocol run (the template minus ``protocol``)."""
  run = copy.deepcopy(config)
  run.unlock()
  del run["protocol"]
  task = spec.task
  if task.startswith("tfds:"):
    run.data.task, run.data.builder = "", task[len("tfds:"):]
  else:
    run.data.task = task
    if task.startswith("fgvc/"):
      # VPT's FGVC pipeline; data.path, if set, holds one folder per dataset.
      run.data.preprocess = "resize_crop_flip"
      if config.data.path:
        run.data.path = os.path.join(config.data.path, task[len("fgvc/"):])
  if (config.protocol.per_task_prompts and config.method == "vpt_deep"
      and task.startswith("vtab/")):
    run.prompt.num_prompts = hparams.vpt_deep_prompts(task[len("vtab/"):]) or (
        run.prompt.num_prompts)
  tune_train, tune_eval, final_train, final_test = splits(config, task)
  if spec.phase == "tune":
    run.data.train_split, run.data.eval_split, run.data.test_split = tune_train, tune_eval, ""
    run.eval.save_predictions = False  # kept for the final runs only
  else:
    # val200 is part of train800val200: evaluating it would only cost time.
    run.data.train_split, run.data.eval_split, run.data.test_split = final_train, "", final_test
  run.optim.base_lr = float(spec.lr)
  run.optim.weight_decay = float(spec.weight_decay)
  run.seed = int(spec.seed)
  run.lock()
  return run
