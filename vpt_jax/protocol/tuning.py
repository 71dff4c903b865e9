"""The papers' tuning protocol as one resumable, shardable command.

For each task (vpt.md 5.5, tune_vtab.py):

1. Grid over base learning rate x weight decay (the reference's grid for the
   method, ``hparams``), training on train800 and scoring val200 at the last
   epoch.
2. Pick the best; ties go to the smaller learning rate (the reference compares
   only the learning rate, so among equal scores at one learning rate the
   first weight decay visited, the largest, stays).
3. Retrain on train800val200 with the seeds 42, 44, 82, 100, 800 and report
   test top-1 at the last epoch: mean and population standard deviation.

FGVC tasks run the same steps on train / val, then train / test.

Every run is an ordinary ``trainer.train_and_evaluate`` in its own folder::

  WORKDIR/<task>/<name>/tune/lr<base lr>_wd<wd>/   config.json, metrics.jsonl, results.json, export/
  WORKDIR/<task>/<name>/final/seed<seed>/
  WORKDIR/<task>/<name>/summary.json                 grid, choice, seeds, mean, std

A finished run leaves ``run.json`` and is skipped when the command is rerun; an
interrupted one resumes from its checkpoint. ``protocol.shard = "i/n"`` makes
a job run every n-th run of the fixed run list (so n jobs on n hosts split the
work); a task's final runs start once all of its grid runs are finished, by
whichever job gets there (rerun a job to pick up finals that were waiting on
other jobs). The report (``report.py``) is rewritten at the end of every job.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional

import ml_collections
import numpy as np
import tensorflow as tf

from vpt_jax.methods import registry
from vpt_jax.protocol import hparams
from vpt_jax.training import fused
from vpt_jax.training import trainer

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "protocol_results.json"
# Fields that may change between invocations without changing a run's result.
NEUTRAL_FIELDS = ("log_every_steps", "eval.", "checkpoint.", "export", "predict.",
                  "data.data_dir", "data.path")
# Split names per benchmark: (tune train, tune eval, final train, final test).
DEFAULT_SPLITS = {
    "vtab": ("train800", "val200", "train800val200", "test"),
    "fgvc": ("train", "val", "train", "test"),
}
RunFn = Callable[[ml_collections.ConfigDict, str], dict]
# (run configs, run folders) -> per run a results dict or a FloatingPointError
# (training/fused.py: train_and_evaluate_settings).
FusedFn = Callable[[list, list], list]


class ProtocolError(ValueError):
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
  from vpt_jax.data import vtab  # pylint: disable=g-import-not-at-top
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
      tasks.extend(f"vtab/{n}" for n in vtab.task_names(item))
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
  wds = tuple(config.protocol.weight_decays) or hparams.WEIGHT_DECAY_GRID
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
  else:
    # val200 is part of train800val200: evaluating it would only cost time.
    run.data.train_split, run.data.eval_split, run.data.test_split = final_train, "", final_test
  run.optim.base_lr = float(spec.lr)
  run.optim.weight_decay = float(spec.weight_decay)
  run.seed = int(spec.seed)
  run.lock()
  return run


# ----------------------------------------------------------------- files

def _write_json(path: str, value) -> None:
  """Writes atomically: jobs on other hosts may read the file at any time."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(value, f, indent=2)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _read_json(path: str):
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _comparable(config) -> dict:
  """The fields a finished run must match, by dotted name, without ``NEUTRAL_FIELDS``.

  ``config``: a ConfigDict, or the "config" of a run record (whose keys older
  versions wrote "/"-joined).
  """
  if isinstance(config, ml_collections.ConfigDict):
    fields = trainer.config_fields(config)
  else:
    fields = {k.replace("/", "."): v for k, v in config.items()}
  return {k: v for k, v in fields.items() if not trainer.in_fields(k, NEUTRAL_FIELDS)}


def finished_run(run_dir: str, config) -> Optional[dict]:
  """The record of a finished run, or None; refuses one made with another config."""
  record = _read_json(os.path.join(run_dir, RUN_FILE))
  if record is None:
    return None
  current = _comparable(config)
  previous = _comparable(record.get("config", {}))
  differing = sorted(k for k in set(current) | set(previous)
                     if current.get(k) != previous.get(k))
  if differing:
    details = "; ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}"
                        for k in differing[:5])
    raise ProtocolError(
        f"{run_dir} finished with a different config ({details}). Use a new --workdir "
        "for the new settings, or delete that run folder to redo it.")
  return record


def _record(spec: RunSpec, run_cfg, run_dir: str, outcome, seconds: float, **extra) -> dict:
  """Writes and returns the run record of a results dict or a divergence.

  A run whose loss diverges is recorded as such (a grid point with a too-large
  learning rate is a normal outcome of the search, not a failure).
  """
  if isinstance(outcome, FloatingPointError):
    print(f"run diverged: {outcome}", file=sys.stderr)
    results, status = {"error": str(outcome)}, "diverged"
  else:
    results, status = outcome, "finished"
  record = {"status": status, "spec": dataclasses.asdict(spec), "seconds": seconds, **extra,
            "config": _comparable(run_cfg), "results": results}
  _write_json(os.path.join(run_dir, RUN_FILE), record)
  return record


def ensure_run(spec: RunSpec, config, workdir: str, run_fn: RunFn) -> dict:
  """Runs (or resumes) one run unless it has finished; returns its record."""
  run_dir = os.path.join(workdir, spec.folder(method_name(config)))
  run_cfg = run_config(config, spec)
  record = finished_run(run_dir, run_cfg)
  if record is not None:
    return record
  print(f"\n=== {spec.task} {spec.phase}: lr {spec.lr:g}, wd {spec.weight_decay:g}, "
        f"seed {spec.seed} -> {run_dir}", flush=True)
  tf.io.gfile.makedirs(run_dir)
  began = time.perf_counter()
  try:
    outcome = run_fn(run_cfg, run_dir)
  except FloatingPointError as e:
    outcome = e
  return _record(spec, run_cfg, run_dir, outcome, time.perf_counter() - began)


def ensure_fused_runs(specs: list[RunSpec], config, workdir: str, fused_fn: FusedFn) -> None:
  """``ensure_run`` for grid runs, ``protocol.fuse_settings`` of a task per program.

  The unfinished grid points of each task train in groups that share one
  compiled program and the frozen backbone (training/fused.py); each run gets
  the folder and record a separate run would ("seconds": its share of the
  group's time).
  """
  name = method_name(config)
  for task in dict.fromkeys(spec.task for spec in specs):
    todo = [spec for spec in specs if spec.task == task and finished_run(
        os.path.join(workdir, spec.folder(name)), run_config(config, spec)) is None]
    configs = [run_config(config, spec) for spec in todo]
    for group in fused.group_settings(configs, config.protocol.fuse_settings):
      run_dirs = [os.path.join(workdir, todo[i].folder(name)) for i in group]
      print(f"\n=== {task} tune, {len(group)} settings in one program: "
            + ", ".join(f"lr {todo[i].lr:g} wd {todo[i].weight_decay:g}" for i in group),
            flush=True)
      for run_dir in run_dirs:
        tf.io.gfile.makedirs(run_dir)
      began = time.perf_counter()
      outcomes = fused_fn([configs[i] for i in group], run_dirs)
      seconds = (time.perf_counter() - began) / len(group)
      for i, run_dir, outcome in zip(group, run_dirs, outcomes):
        _record(todo[i], configs[i], run_dir, outcome, seconds, fused_settings=len(group))


def _top1(record: Optional[dict], split: str) -> Optional[float]:
  if record is None or record["status"] != "finished":
    return None
  return float(record["results"][split]["top1"])


def select(grid_records: list[tuple[RunSpec, Optional[dict]]]) -> Optional[dict]:
  """The best grid point, or None while a grid run is missing.

  Visits the grid in its order (lr descending, then wd descending) and takes a
  later point only if it scores higher, or equal with a smaller lr (the
  reference's find_best_lrwd). Diverged runs score nothing.
  """
  if any(record is None for _, record in grid_records):
    return None
  best = None
  for spec, record in grid_records:
    score = _top1(record, "val")
    if score is None:
      continue
    if (best is None or score > best["val_top1"]
        or (score == best["val_top1"] and spec.lr < best["lr"])):
      best = {"lr": spec.lr, "weight_decay": spec.weight_decay, "val_top1": score}
  if best is None:
    raise ProtocolError(f"every grid run of {grid_records[0][0].task} diverged; lower "
                        "the learning rates (--config.protocol.lrs) and rerun")
  return best


def summarize(task: str, name: str, base_method: str, grid_records, best,
              final_records) -> dict:
  """The summary.json of one task: the grid, the choice, the seeds, mean, std."""
  tests = [_top1(record, "test") for _, record in final_records]
  done = [t for t in tests if t is not None]
  complete = best is not None and all(r is not None for _, r in final_records)
  return {
      "task": task, "method": name, "base_method": base_method,
      "grid": [{"lr": s.lr, "weight_decay": s.weight_decay, "val_top1": _top1(r, "val"),
                "status": r["status"] if r else "pending"} for s, r in grid_records],
      "best": best,
      "finals": [{"seed": s.seed, "test_top1": t,
                  "status": r["status"] if r else "pending"}
                 for (s, r), t in zip(final_records, tests)],
      "complete": complete and len(done) == len(tests),
      "test_top1_mean": float(np.mean(done)) if done else None,
      # Population std (ddof=0), as VPT's demo reports it.
      "test_top1_std": float(np.std(done)) if done else None,
      "num_seeds": len(done),
  }


def run_protocol(config: ml_collections.ConfigDict, workdir: str,
                 run_fn: Optional[RunFn] = None, write_report: bool = True,
                 fused_fn: Optional[FusedFn] = None) -> list[dict]:
  """Runs this job's share of the protocol; returns the tasks' summaries.

  Args:
    config: a protocol config (``configs/vtab_protocol.py``): a run template
      plus ``config.protocol``.
    workdir: the results folder.
    run_fn: (run config, run folder) -> results dict with ["val"]["top1"] and
      ["test"]["top1"]; default ``trainer.train_and_evaluate``.
    write_report: rewrite the report at the end.
    fused_fn: trains a group of grid runs when ``protocol.fuse_settings`` > 1;
      default ``fused.train_and_evaluate_settings``.
  """
  run_fn = run_fn or trainer.train_and_evaluate
  fused_fn = fused_fn or fused.train_and_evaluate_settings
  shard, num_shards = parse_shard(config.protocol.shard)
  runs = plan(config)
  mine = {k for k in range(len(runs)) if k % num_shards == shard}
  name = method_name(config)
  tf.io.gfile.makedirs(workdir)
  print(f"protocol: {len(runs)} runs over {len(parse_tasks(config.protocol.tasks))} "
        f"task(s); this job ({shard}/{num_shards}) owns {len(mine)}", flush=True)

  def record_of(spec):
    return finished_run(os.path.join(workdir, spec.folder(name)), run_config(config, spec))

  # 1. This job's grid runs, one by one or protocol.fuse_settings per program.
  tune = [spec for k, spec in enumerate(runs) if k in mine and spec.phase == "tune"]
  if config.protocol.fuse_settings < 0:
    raise ProtocolError(f"protocol.fuse_settings must be >= 0 (0: one run per program), "
                        f"got {config.protocol.fuse_settings}")
  if config.protocol.fuse_settings > 1:
    ensure_fused_runs(tune, config, workdir, fused_fn)
  else:
    for spec in tune:
      ensure_run(spec, config, workdir, run_fn)

  # 2. Selection and final runs of every task whose grid is finished.
  summaries, waiting = [], []
  for task in parse_tasks(config.protocol.tasks):
    indexed = [(k, s) for k, s in enumerate(runs) if s.task == task]
    grid_records = [(s, record_of(s)) for _, s in indexed if s.phase == "tune"]
    best = select(grid_records)
    finals = [(k, s) for k, s in indexed if s.phase == "final"]
    if best is not None:
      finals = [(k, dataclasses.replace(s, lr=best["lr"], weight_decay=best["weight_decay"]))
                for k, s in finals]
      for k, spec in finals:
        if k in mine:
          ensure_run(spec, config, workdir, run_fn)
      final_records = [(s, record_of(s)) for _, s in finals]
    else:
      waiting.append(task)
      final_records = [(s, None) for _, s in finals]
    summary = summarize(task, name, config.method, grid_records, best, final_records)
    _write_json(os.path.join(workdir, task_folder(task), name, SUMMARY_FILE), summary)
    summaries.append(summary)

  if waiting:
    print(f"\nwaiting for other jobs' grid runs of: {', '.join(waiting)}; rerun this "
          "command once they finish to run the final seeds", flush=True)
  print("\n" + format_summaries(summaries), flush=True)
  if write_report:
    from vpt_jax.protocol import report  # pylint: disable=g-import-not-at-top
    out = report.write_report(workdir)
    print(f"\nreport: {out}", flush=True)
  return summaries


def format_summaries(summaries: list[dict]) -> str:
  """One line per task: choice and final test top-1 (%)."""
  lines = ["| task | method | best lr | best wd | val200 top-1 | test top-1 (mean +- std) | "
           "seeds |", "|---|---|---|---|---|---|---|"]
  for s in summaries:
    best = s["best"] or {}
    mean = (f"{100 * s['test_top1_mean']:.2f} +- {100 * s['test_top1_std']:.2f}"
            if s["test_top1_mean"] is not None else "-")
    lines.append(f"| {s['task']} | {s['method']} | {best.get('lr', '-')} | "
                 f"{best.get('weight_decay', '-')} | "
                 + (f"{100 * best['val_top1']:.1f}" if best else "-")
                 + f" | {mean} | {s['num_seeds']}/{len(s['finals'])} |")
  return "\n".join(lines)
