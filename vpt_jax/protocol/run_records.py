"""Run records: running (or resuming) one protocol run unless it has finished.

A finished run leaves ``run.json`` (its status, spec, seconds, comparable config
and results) and is skipped when the protocol is rerun; a rerun with a config
that differs in more than ``NEUTRAL_FIELDS`` is refused. A run whose loss
diverges is recorded as such, not raised: a too-large learning rate is a
normal outcome of the grid search.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional

import ml_collections
import tensorflow as tf

from vpt_jax.protocol import run_plan
from vpt_jax.training import config_checks
from vpt_jax.training import sweeps

RUN_FILE = "run.json"
# Fields that may change between invocations without changing a run's result.
NEUTRAL_FIELDS = ("log_every_steps", "eval.", "checkpoint.", "export", "predict.",
                  "data.data_dir", "data.path",
                  # only permits an empty init_checkpoint; records before it lack it
                  "model.from_scratch",
                  # records only; records before it lack it
                  "data.fingerprint")
RunFn = Callable[[ml_collections.ConfigDict, str], dict]
# (run configs, run folders) -> per run a results dict or a FloatingPointError
# (training/sweeps.py: train_and_evaluate_settings).
FusedFn = Callable[[list, list], list]


def write_json(path: str, value) -> None:
  """Writes atomically: jobs on other hosts may read the file at any time."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(value, f, indent=2)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def json_files_below(results_dirs: list[str], filename: str) -> list[tuple[str, dict]]:
  """[(folder, parsed JSON)] of every ``filename`` below the folders, in walk order."""
  found = []
  for results_dir in results_dirs:
    for root, _, filenames in sorted(os.walk(results_dir)):
      if filename in filenames:
        with open(os.path.join(root, filename)) as f:
          found.append((root, json.load(f)))
  return found


def read_json(path: str):
  """The parsed JSON file at ``path`` (local or remote), or None if there is none."""
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
    fields = config_checks.config_fields(config)
  else:
    fields = {k.replace("/", "."): v for k, v in config.items()}
  return {k: v for k, v in fields.items() if not config_checks.in_fields(k, NEUTRAL_FIELDS)}


def finished_run(run_dir: str, config) -> Optional[dict]:
  """The record of a finished run, or None; refuses one made with another config."""
  record = read_json(os.path.join(run_dir, RUN_FILE))
  if record is None:
    return None
  current = _comparable(config)
  previous = _comparable(record.get("config", {}))
  differing = sorted(k for k in set(current) | set(previous)
                     if current.get(k) != previous.get(k))
  if differing:
    details = "; ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}"
                        for k in differing[:5])
    raise run_plan.ProtocolError(
        f"{run_dir} finished with a different config ({details}). Use a new --workdir "
        "for the new settings, or delete that run folder to redo it.")
  return record


def record_of(spec: run_plan.RunSpec, config, workdir: str) -> Optional[dict]:
  """The record of ``spec``'s run if it has finished, else None (``finished_run``)."""
  return finished_run(os.path.join(workdir, spec.folder(run_plan.method_name(config))),
                      run_plan.run_config(config, spec))


def _record(spec: run_plan.RunSpec, run_cfg, run_dir: str, outcome, seconds: float,
            **extra) -> dict:
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
  write_json(os.path.join(run_dir, RUN_FILE), record)
  return record


def ensure_run(spec: run_plan.RunSpec, config, workdir: str, run_fn: RunFn) -> dict:
  """Runs (or resumes) one run unless it has finished; returns its record."""
  run_dir = os.path.join(workdir, spec.folder(run_plan.method_name(config)))
  return run_unless_finished(
      spec, run_plan.run_config(config, spec), run_dir, run_fn,
      f"{spec.task} {spec.phase}: lr {spec.lr:g}, wd {spec.weight_decay:g}, seed {spec.seed}")


def run_unless_finished(spec, run_cfg, run_dir: str, run_fn: RunFn, title: str) -> dict:
  """The record of a finished run in ``run_dir``, else runs (or resumes) it and records it.

  ``spec``: any dataclass (recorded as "spec"); ``title``: what the console line says.
  """
  record = finished_run(run_dir, run_cfg)
  if record is not None:
    return record
  print(f"\n=== {title} -> {run_dir}", flush=True)
  tf.io.gfile.makedirs(run_dir)
  began = time.perf_counter()
  try:
    outcome = run_fn(run_cfg, run_dir)
  except FloatingPointError as e:
    outcome = e
  return _record(spec, run_cfg, run_dir, outcome, time.perf_counter() - began)


def ensure_fused_runs(specs: list[run_plan.RunSpec], config, workdir: str,
                      fused_fn: FusedFn) -> None:
  """``ensure_run`` for grid runs, ``protocol.fuse_settings`` of a task per program.

  The unfinished grid points of each task train in groups that share one
  compiled program and the frozen backbone (training/sweeps.py); each run gets
  the folder and record a separate run would ("seconds": its share of the
  group's time).
  """
  name = run_plan.method_name(config)
  for task in dict.fromkeys(spec.task for spec in specs):
    todo = [spec for spec in specs
            if spec.task == task and record_of(spec, config, workdir) is None]
    configs = [run_plan.run_config(config, spec) for spec in todo]
    for group in sweeps.group_settings(configs, config.protocol.fuse_settings):
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
