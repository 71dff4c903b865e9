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

The plan and the runs' configs are in ``run_plan``, running and recording one
run in ``run_records``, choosing the best grid point and summarising a task in
``selection``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import ml_collections
import tensorflow as tf

from vpt_jax.protocol import run_plan
from vpt_jax.protocol import run_records
from vpt_jax.protocol import selection
from vpt_jax.training import sweeps
from vpt_jax.training import trainer

SUMMARY_FILE = "summary.json"
RESULTS_FILE = "protocol_results.json"


def _run_grid(config, workdir: str, tune: list[run_plan.RunSpec],
              run_fn: run_records.RunFn, fused_fn: run_records.FusedFn) -> None:
  """This job's grid runs, one by one or ``protocol.fuse_settings`` per program."""
  if config.protocol.fuse_settings < 0:
    raise run_plan.ProtocolError(
        f"protocol.fuse_settings must be >= 0 (0: one run per program), "
        f"got {config.protocol.fuse_settings}")
  if config.protocol.fuse_settings > 1:
    run_records.ensure_fused_runs(tune, config, workdir, fused_fn)
  else:
    for spec in tune:
      run_records.ensure_run(spec, config, workdir, run_fn)


def _finish_task(task: str, config, workdir: str, runs: list[run_plan.RunSpec],
                 mine: set[int], run_fn: run_records.RunFn) -> dict:
  """Selects the task's best grid point and runs this job's finals once its grid is
  finished; writes and returns the task's summary ("best" None: still waiting)."""
  indexed = [(k, s) for k, s in enumerate(runs) if s.task == task]
  grid_records = [(s, run_records.record_of(s, config, workdir))
                  for _, s in indexed if s.phase == "tune"]
  best = selection.select(grid_records)
  finals = [(k, s) for k, s in indexed if s.phase == "final"]
  if best is not None:
    finals = [(k, dataclasses.replace(s, lr=best["lr"], weight_decay=best["weight_decay"]))
              for k, s in finals]
    for k, spec in finals:
      if k in mine:
        run_records.ensure_run(spec, config, workdir, run_fn)
    final_records = [(s, run_records.record_of(s, config, workdir)) for _, s in finals]
  else:
    final_records = [(s, None) for _, s in finals]
  name = run_plan.method_name(config)
  summary = selection.summarize(task, name, config.method, grid_records, best, final_records)
  run_records.write_json(os.path.join(workdir, run_plan.task_folder(task), name, SUMMARY_FILE),
                         summary)
  return summary


def run_protocol(config: ml_collections.ConfigDict, workdir: str,
                 run_fn: Optional[run_records.RunFn] = None, write_report: bool = True,
                 fused_fn: Optional[run_records.FusedFn] = None) -> list[dict]:
  """Runs this job's share of the protocol; returns the tasks' summaries.

  Args:
    config: a protocol config (``configs/vtab_protocol.py``): a run template
      plus ``config.protocol``.
    workdir: the results folder.
    run_fn: (run config, run folder) -> results dict with ["val"]["top1"] and
      ["test"]["top1"]; default ``trainer.train_and_evaluate``.
    write_report: rewrite the report at the end.
    fused_fn: trains a group of grid runs when ``protocol.fuse_settings`` > 1;
      default ``sweeps.train_and_evaluate_settings``.
  """
  run_fn = run_fn or trainer.train_and_evaluate
  fused_fn = fused_fn or sweeps.train_and_evaluate_settings
  shard, num_shards = run_plan.parse_shard(config.protocol.shard)
  runs = run_plan.plan(config)
  mine = {k for k in range(len(runs)) if k % num_shards == shard}
  tasks = run_plan.parse_tasks(config.protocol.tasks)
  tf.io.gfile.makedirs(workdir)
  print(f"protocol: {len(runs)} runs over {len(tasks)} "
        f"task(s); this job ({shard}/{num_shards}) owns {len(mine)}", flush=True)
  # 1. This job's grid runs; 2. selection and final runs of every finished grid.
  _run_grid(config, workdir,
            [spec for k, spec in enumerate(runs) if k in mine and spec.phase == "tune"],
            run_fn, fused_fn)
  summaries = [_finish_task(task, config, workdir, runs, mine, run_fn) for task in tasks]
  waiting = [s["task"] for s in summaries if s["best"] is None]
  if waiting:
    print(f"\nwaiting for other jobs' grid runs of: {', '.join(waiting)}; rerun this "
          "command once they finish to run the final seeds", flush=True)
  print("\n" + selection.format_summaries(summaries), flush=True)
  if write_report:
    from vpt_jax.protocol import report  # pylint: disable=g-import-not-at-top
    out = report.write_report(workdir)
    print(f"\nreport: {out}", flush=True)
  return summaries
