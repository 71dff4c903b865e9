"""The offline quickstart: transfer from a shipped sprites-pretrained ViT.

A suite config names a backbone, downstream tasks (TFDS datasets built locally,
no download) and methods; every (task, method) pair is one ordinary training
run through ``trainer.train_and_evaluate`` in ``workdir/<task>/<method>``. The
suite prints a table and writes ``workdir/results.json`` (a list of objects
with task, method, accuracy, trainable_params and more). Finished runs are
reused, so a rerun of the same command resumes the suite.

``suite.run_order`` may also name any registry method without a tuned entry in
``suite.runs``: it runs from the pretrained backbone with the base learning
rate of its default optimizer's family (``UNTUNED_BASE_LRS``). Every run's
config (model.dtype included, which passes from ``suite.base`` to every run)
is validated before any dataset is built.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from vpt_jax import errors
from vpt_jax.data import local_builders  # pylint: disable=unused-import  (registers builders)
from vpt_jax.methods import registry
from vpt_jax.training import config_checks
from vpt_jax.training import results as results_lib
from vpt_jax.training import trainer

RESULTS_FILE = "results.json"
SINGLE_THREADED_XLA = "--xla_cpu_multi_thread_eigen=false"
# Base learning rates (scaled by batch / 256) of registry methods the suite has
# no tuned run for, by their default optimizer: the tuned VPT runs' SGD rate and
# full fine-tuning's AdamW rate. Not tuned per method: a starting point.
UNTUNED_BASE_LRS = {"sgd": 0.4, "adamw": 4e-3, "torch_adamw": 4e-3, "timm_adamw": 4e-3}


def resolve_run(suite: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The run named ``name``: the suite's tuned entry, else the registry method untuned.

  Raises:
    UserError: a name that is neither a suite run nor a registry method.
  """
  if name in suite.runs:
    return suite.runs[name]
  try:
    method = registry.get_method(name)
  except errors.UserError as e:
    raise errors.UserError(f"run_order names {name!r}, neither a run of the suite "
                           f"({', '.join(suite.runs)}) nor a method: {e}") from e
  return ml_collections.ConfigDict(dict(
      method=name, pretrained=True,
      overrides=(("optim.base_lr", UNTUNED_BASE_LRS[method.optimizer]),)))


def run_config(suite: ml_collections.ConfigDict, task: str, run_name: str,
               data_dir: str) -> ml_collections.ConfigDict:
  """The single-run config of one (task, method) pair of a suite."""
  config = copy.deepcopy(suite.base)
  config.unlock()
  task_cfg = suite.tasks[task]
  run_cfg = resolve_run(suite, run_name)
  config.method = run_cfg.method
  config.data.builder = task_cfg.builder
  config.data.label_key = task_cfg.label_key
  config.data.train_split = task_cfg.train_split
  config.data.test_split = task_cfg.test_split
  config.data.data_dir = data_dir
  config.model.init_checkpoint = suite.backbone if run_cfg.pretrained else ""
  config.model.from_scratch = not run_cfg.pretrained  # the "scratch" baseline, on purpose
  for key, value in run_cfg.overrides:
    section, _, field = key.partition(".")
    config[section][field] = value
  config.lock()
  return config


def check_suite(suite: ml_collections.ConfigDict, workdir: str) -> None:
  """Validates every (task, run) config (methods, model.dtype, ...) before any compute."""
  for task in suite.task_order:
    if task not in suite.tasks:
      raise errors.UserError(f"task_order names {task!r}; the suite's tasks are "
                             f"{', '.join(suite.tasks)}")
    for run_name in suite.run_order:
      config_checks.validate_config(
          run_config(suite, task, run_name, os.path.join(workdir, "tfds")))


def prepare_data(suite: ml_collections.ConfigDict, data_dir: str) -> None:
  """Builds the suite's local TFDS datasets (no download) once."""
  for builder_name in sorted({t.builder for t in suite.tasks.values()}):
    tfds.builder(builder_name, data_dir=data_dir).download_and_prepare()


def format_table(rows: list[dict]) -> str:
  """A markdown table of the suite's results."""
  lines = ["| task | method | test accuracy | trainable params | % of backbone | seconds |",
           "|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['task']} | {row['method']} | {row['accuracy']:.3f} | "
                 f"{row['trainable_params']:,} | {row['percent_of_backbone']:.2f}% | "
                 f"{row['seconds']:.0f} |")
  return "\n".join(lines)


def run_pair(suite: ml_collections.ConfigDict, task: str, method_run: str,
             workdir: str) -> dict:
  """Trains one (task, method) pair unless its results exist; returns its results."""
  run_dir = os.path.join(workdir, task, method_run)
  results_path = os.path.join(run_dir, results_lib.RESULTS_FILE)
  if tf.io.gfile.exists(results_path):
    with tf.io.gfile.GFile(results_path) as f:
      return json.load(f)
  began = time.perf_counter()
  print(f"=== {task} / {method_run} ===", flush=True)
  results = trainer.train_and_evaluate(
      run_config(suite, task, method_run, os.path.join(workdir, "tfds")), run_dir)
  results["seconds"] = time.perf_counter() - began
  with tf.io.gfile.GFile(results_path, "w") as f:
    json.dump(results, f, indent=2)
  print(f"=== {task} / {method_run}: test top-1 {results['test']['top1']:.3f} "
        f"({results['seconds']:.0f}s) ===", flush=True)
  return results


def _run_pair_star(args):
  return run_pair(*args)


def _single_threaded_xla():
  """A worker's initializer: XLA reads XLA_FLAGS when JAX first computes, i.e. later."""
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREADED_XLA}".strip()


def run_suite(suite: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs every (task, method) pair of the suite; returns and writes the rows.

  With ``suite.workers`` > 1 the pairs are spread over that many processes,
  each single-threaded: small models keep one core busy and XLA compiles on
  one core, so two workers on two cores take about half the time.
  """
  check_suite(suite, workdir)
  tf.io.gfile.makedirs(workdir)
  start = time.perf_counter()
  prepare_data(suite, os.path.join(workdir, "tfds"))
  print(f"datasets ready in {time.perf_counter() - start:.0f}s", flush=True)
  pairs = [(task, method_run) for task in suite.task_order for method_run in suite.run_order]
  jobs = [(suite, task, method_run, workdir) for task, method_run in pairs]
  if suite.workers > 1:
    with multiprocessing.get_context("spawn").Pool(
        suite.workers, initializer=_single_threaded_xla) as pool:
      all_results = pool.map(_run_pair_star, jobs, chunksize=1)
  else:
    all_results = [run_pair(*job) for job in jobs]
  rows = []
  for (task, method_run), results in zip(pairs, all_results):
    rows.append({
        "task": task, "method": method_run,
        "accuracy": results["test"]["top1"],
        "trainable_params": results["trainable_params"],
        "percent_of_backbone": 100 * results["trainable_params"] / results["backbone_params"],
        "seconds": results.get("seconds", 0.0),
        "export": results.get("export"),
    })
  with tf.io.gfile.GFile(os.path.join(workdir, RESULTS_FILE), "w") as f:
    json.dump(rows, f, indent=2)
  print("\n" + format_table(rows))
  print(f"\nquickstart finished in {time.perf_counter() - start:.0f}s; results in "
        f"{os.path.join(workdir, RESULTS_FILE)}")
  return rows
