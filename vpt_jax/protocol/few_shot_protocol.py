"""NOAH's few-shot and domain-generalisation protocols as one resumable command.

Few-shot FGVC (NOAH, ``configs/*/few-shot/*.sh``): for every dataset, method,
shot count (1, 2, 4, 8, 16) and draw (seeds 0, 1, 2), train on the drawn shots
(``data/few_shot.py``) and score the test split at the last epoch. NOAH tunes
nothing here: every method runs with the same settings (AdamW, lr 0.005,
weight decay 1e-4, batch 64, 100 epochs, 10 warmup epochs;
``configs/few_shot_protocol.py`` sets them). The draw seed picks the shots;
the training seed stays the config's ``seed`` (NOAH's ``--seed`` is 0 in every
run), so the spread over seeds is the spread over draws.

Domain generalisation (``few_shot.targets``, with ``few_shot.datasets =
imagenet``): each ImageNet run (16 shots in NOAH) is also scored on ImageNet-V2,
-Sketch, -A and -R from its task export (``domain_shift``).

Every run is an ordinary ``trainer.train_and_evaluate`` in its own folder::

  WORKDIR/fewshot/<dataset>/<method>/shots<N>/seed<S>/   run.json, results.json, export/
  WORKDIR/fewshot/<dataset>/<method>/few_shot.json       per shots: seeds, mean, std

A finished run (run.json) is skipped on a rerun; ``few_shot.shard = "i/n"``
runs every n-th run of the fixed list.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Callable, Optional

import ml_collections
import numpy as np
import tensorflow as tf

from vpt_jax import errors
from vpt_jax.data import few_shot
from vpt_jax.data import imagenet_shifts
from vpt_jax.methods import registry
from vpt_jax.protocol import few_shot_report
from vpt_jax.protocol import run_plan
from vpt_jax.protocol import run_records

SUMMARY_FILE = few_shot_report.SUMMARY_FILE
RunFn = Callable[[ml_collections.ConfigDict, str], dict]
# (run config, run folder, targets) -> {target name: scores}
TargetFn = Callable[[ml_collections.ConfigDict, str, list], dict]


@dataclasses.dataclass(frozen=True)
class FewShotRun:
  """One run: a method on one draw of one dataset."""
  dataset: str
  method: str
  shots: int
  seed: int

  def folder(self) -> str:
    return os.path.join("fewshot", self.dataset, self.method, f"shots{self.shots}",
                        f"seed{self.seed}")


def parse_datasets(spec: str) -> list[str]:
  """"fgvc" (NOAH's five), "imagenet", or "+"-joined names -> dataset names."""
  names = []
  for item in filter(None, spec.split("+")):
    names += list(few_shot.FGVC) if item == "fgvc" else [few_shot.get_dataset(item).name]
  if not names:
    raise errors.UserError("few_shot.datasets is empty; e.g. datasets=fgvc, imagenet or "
                           "oxford_pets+food101")
  return list(dict.fromkeys(names))


def parse_methods(spec: str) -> list[str]:
  names = [registry.get_method(m).name for m in filter(None, spec.split("+"))]
  if not names:
    raise errors.UserError("few_shot.methods is empty; e.g. methods=vpt_deep+lora+linear")
  return list(dict.fromkeys(names))


def check_config(config) -> None:
  """Refuses a bad grid before any run starts (one line naming the fix)."""
  fs = config.few_shot
  for shots in fs.shots:
    problem = few_shot.check_shots(int(shots), 0)
    if problem:
      raise errors.UserError(problem.replace("data.shots", "few_shot.shots"))
  if not fs.shots or not fs.seeds or min(int(s) for s in fs.seeds) < 0:
    raise errors.UserError(f"few_shot.shots={tuple(fs.shots)} and few_shot.seeds="
                           f"{tuple(fs.seeds)} must be non-empty, seeds >= 0 "
                           "(NOAH: shots 1,2,4,8,16; seeds 0,1,2)")
  datasets = parse_datasets(fs.datasets)
  parse_methods(fs.methods)
  if fs.targets:
    imagenet_shifts.parse_targets(fs.targets)
    if datasets != ["imagenet"]:
      raise errors.UserError("few_shot.targets (ImageNet-V2/-Sketch/-A/-R) score ImageNet "
                             "models: set --config.few_shot.datasets=imagenet")
    if not config.export.enabled:
      raise errors.UserError("few_shot.targets are scored from each run's export: set "
                             "--config.export.enabled=True")
  for dataset in datasets:
    _check_data(config, few_shot.get_dataset(dataset), len(datasets) > 1)


def _check_data(config, dataset: few_shot.FewShotDataset, several: bool) -> None:
  """Refuses a dataset with neither NOAH's lists (data.path) nor a TFDS builder."""
  if not config.data.path:
    if not dataset.tfds_builder:
      raise errors.UserError(
          f"{dataset.title} has no TFDS builder: set data.path (path=DIR) to a folder with "
          f"NOAH's lists in DIR/{dataset.noah_folder}/annotations/, or leave it out of "
          "few_shot.datasets")
    return
  path = _data_path(config, dataset.name, several)
  if not tf.io.gfile.isdir(os.path.join(path, "annotations")):
    raise errors.MissingInputError(
        f"{path}/annotations is missing: data.path holds NOAH's data/few-shot/<folder> "
        + ("per dataset (fgvc-aircraft, food101, ...)" if several else "of the dataset")
        + " with its annotations/ lists")
  lists = [few_shot.list_file(dataset, path, "test", 0, 0)] + [
      few_shot.list_file(dataset, path, "train", int(n), int(s))
      for n in config.few_shot.shots for s in config.few_shot.seeds]
  missing = [p for p in lists if not tf.io.gfile.exists(p)]
  if missing:
    raise errors.MissingInputError(
        f"NOAH list {missing[0]} is missing ({len(missing)} of the grid's {len(lists)} lists); "
        f"copy data/few-shot/{dataset.noah_folder}/annotations/ from NOAH's repository")


def plan(config) -> list[FewShotRun]:
  """Every run, in the fixed order sharding is defined on."""
  fs = config.few_shot
  return [FewShotRun(dataset, method, int(shots), int(seed))
          for dataset in parse_datasets(fs.datasets) for method in parse_methods(fs.methods)
          for shots in fs.shots for seed in fs.seeds]


def _data_path(config, dataset: str, several: bool) -> str:
  if not config.data.path:
    return ""
  folder = few_shot.get_dataset(dataset).noah_folder
  return os.path.join(config.data.path, folder) if several else config.data.path


def run_config(config, spec: FewShotRun, several: bool) -> ml_collections.ConfigDict:
  """The single-run config of one run (the template minus ``few_shot``)."""
  run = copy.deepcopy(config)
  run.unlock()
  del run["few_shot"]
  run.method = spec.method
  run.data.task = f"fewshot/{spec.dataset}"
  run.data.path = _data_path(config, spec.dataset, several)
  run.data.shots, run.data.shots_seed = spec.shots, spec.seed
  run.data.train_split, run.data.eval_split, run.data.test_split = "train", "", "test"
  run.lock()
  return run


def ensure_run(spec: FewShotRun, run_cfg, workdir: str, run_fn: RunFn,
               targets: list, target_fn: Optional[TargetFn]) -> dict:
  """Runs one run (and scores its export on the targets) unless it has finished."""
  def train_and_score(cfg, run_dir):
    results = run_fn(cfg, run_dir)
    return {**results, "targets": target_fn(cfg, run_dir, targets)} if targets else results
  return run_records.run_unless_finished(
      spec, run_cfg, os.path.join(workdir, spec.folder()), train_and_score,
      f"fewshot/{spec.dataset} {spec.method}: {spec.shots} shots, draw {spec.seed}")


def _stats(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)) if values else None,
          "std": float(np.std(values)) if values else None}  # population std, as tuning


def summarize(dataset: str, method: str, records: list[tuple[FewShotRun, Optional[dict]]],
              targets: list) -> dict:
  """One dataset and method: per shot count the seeds' test top-1, mean and std.

  ``targets``: per shot count also each target's restricted and 1000-way top-1.
  """
  by_shots = {}
  for spec, record in records:
    entry = by_shots.setdefault(str(spec.shots), {"seeds": {}, "targets": {}})
    finished = record is not None and record["status"] == "finished"
    entry["seeds"][str(spec.seed)] = record["results"]["test"]["top1"] if finished else None
    for target in targets if finished else []:
      scores = record["results"]["targets"][target.name]
      entry["targets"].setdefault(target.name, []).append(scores)
  for entry in by_shots.values():
    done = [v for v in entry["seeds"].values() if v is not None]
    entry.update(_stats(done), num_seeds=len(done), planned=len(entry["seeds"]))
    entry["targets"] = {name: {**{k: _stats([s[k] for s in scores])
                                  for k in ("top1", "top1_1000way")}, "num_seeds": len(scores)}
                        for name, scores in entry["targets"].items()}
  return {"dataset": dataset, "method": method, "shots": by_shots,
          "complete": all(r is not None for _, r in records)}


def run_protocol(config: ml_collections.ConfigDict, workdir: str,
                 run_fn: Optional[RunFn] = None, target_fn: Optional[TargetFn] = None,
                 write_report: bool = True) -> list[dict]:
  """Runs this job's share of the grid; writes and returns the summaries."""
  check_config(config)
  if run_fn is None:
    from vpt_jax.training import trainer  # pylint: disable=g-import-not-at-top
    run_fn = trainer.train_and_evaluate
  if target_fn is None:
    from vpt_jax.protocol import domain_shift  # pylint: disable=g-import-not-at-top
    target_fn = domain_shift.score_targets
  targets = imagenet_shifts.parse_targets(config.few_shot.targets) if config.few_shot.targets else []
  shard, num_shards = run_plan.parse_shard(config.few_shot.shard)
  runs = plan(config)
  several = len(parse_datasets(config.few_shot.datasets)) > 1
  print(f"few-shot protocol: {len(runs)} runs; this job ({shard}/{num_shards}) owns "
        f"{len(runs[shard::num_shards])}", flush=True)
  records = {}
  for k, spec in enumerate(runs):
    run_cfg = run_config(config, spec, several)
    if k % num_shards == shard:
      records[spec] = ensure_run(spec, run_cfg, workdir, run_fn, targets, target_fn)
    else:
      records[spec] = run_records.finished_run(os.path.join(workdir, spec.folder()), run_cfg)
  summaries = []
  for dataset, method in dict.fromkeys((s.dataset, s.method) for s in runs):
    mine = [(s, records[s]) for s in runs if (s.dataset, s.method) == (dataset, method)]
    summary = {**summarize(dataset, method, mine, targets),
               "shots_from": "NOAH's lists" if config.data.path else "TFDS draw"}
    run_records.write_json(os.path.join(workdir, "fewshot", dataset, method, SUMMARY_FILE),
                           summary)
    summaries.append(summary)
  if write_report:
    from vpt_jax.protocol import report  # pylint: disable=g-import-not-at-top
    print(f"\nreport: {report.write_report(workdir)}", flush=True)
  return summaries
