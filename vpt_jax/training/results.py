"""What a finished run reports: its parameter counts, its scores, its export, results.json.

``finish`` is the one results path of separate runs and sweeps: it scores the
runs that did not diverge on the final splits, exports each task and writes
each run's results.json.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Optional, Sequence, Union

import jax
import numpy as np
import tensorflow as tf

from vpt_jax.checkpoints import merge as merge_lib
from vpt_jax.data import fingerprints
from vpt_jax.export import merging
from vpt_jax.export import standalone
from vpt_jax.export import task_export
from vpt_jax.methods import registry
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import costs
from vpt_jax.training import evaluation
from vpt_jax.training import inputs
from vpt_jax.training import predictions
from vpt_jax.training import setup

RESULTS_FILE = "results.json"
# What a run ends with: results.json's dict, or the error of a diverged run.
Outcome = Union[dict, FloatingPointError]


def parameter_overview(params, labels, backbone_size: int) -> str:
  """A table of trainable and frozen parameters per top-level module."""
  flat_labels = trees.flatten(labels)
  groups: dict[str, list[int]] = {}
  for path, value in trees.flatten(params).items():
    row = groups.setdefault(path.split("/")[0], [0, 0])
    row[flat_labels[path] != freezing.TRAIN] += int(np.prod(value.shape))
  lines = [f"{'module':<16}{'trainable':>14}{'frozen':>14}"]
  for name, (trainable, frozen) in sorted(groups.items()):
    lines.append(f"{name:<16}{trainable:>14,}{frozen:>14,}")
  total_trainable = sum(t for t, _ in groups.values())
  total = sum(t + f for t, f in groups.values())
  lines.append(f"{'total':<16}{total_trainable:>14,}{total - total_trainable:>14,}")
  lines.append(f"trainable: {total_trainable:,} of {total:,} = "
               f"{100 * total_trainable / max(total, 1):.3f}% "
               f"({100 * total_trainable / max(backbone_size, 1):.3f}% of the "
               f"{backbone_size:,}-parameter backbone)")
  return "\n".join(lines)


def backbone_size(params, fresh=merge_lib.DEFAULT_FRESH) -> int:
  """Parameters of the backbone alone: all but those matching a ``fresh`` regex.

  Pass the method's ``fresh_patterns`` (head and the method's own parameters).
  """
  patterns = [re.compile(p) for p in fresh]
  return sum(int(np.prod(v.shape)) for p, v in trees.flatten(params).items()
             if not any(pattern.fullmatch(p) for pattern in patterns))



def finish(runs: Sequence[setup.Run], evaluate_split: Callable[[str], list],
           diverged: Optional[dict] = None,
           log_prefix: Callable[[setup.Run], str] = lambda run: "") -> list[Outcome]:
  """Scores ``runs`` on the final splits, exports them and writes their results.json.

  Args:
    runs: runs whose ``state`` is final.
    evaluate_split: split -> per run {"top1", "top5", "loss", "count"}; one
      pass over the split serves all runs.
    diverged: {position in ``runs``: the error} of runs whose loss or state
      became non-finite; they get their error back and are not scored.
    log_prefix: what starts each console line of a run's scores.

  Returns:
    Per run what ``write_results`` wrote, or its error.
  """
  diverged = diverged or {}
  splits = evaluation.final_splits(runs[0].config) if len(diverged) < len(runs) else []
  scores = {name: evaluate_split(split) for name, split in splits}
  data = data_fingerprints(runs[0].config, runs[0].data) if splits else None
  # The settings share the model: one forward measured serves them all.
  speed = costs.inference(runs[0]) if splits and runs[0].config.eval.costs else None
  return [diverged[index] if index in diverged else write_results(
              run, {name: per_run[index] for name, per_run in scores.items()},
              log_prefix=log_prefix(run), data=data, inference=speed)
          for index, run in enumerate(runs)]


def data_fingerprints(config, train: Optional[inputs.TrainData] = None) -> Optional[dict]:
  """{"train"/"val"/"test": the split's fingerprint and split string} (process 0), or None.

  ``data.fingerprint`` off, or another process: None. One pass over each
  split without the model (``data.fingerprints``; cached per process); the
  training split's pixels come from ``train``, the run's decoded copy, if given.
  """
  if not config.data.fingerprint or jax.process_index() != 0:
    return None
  decoded = None if train is None else (train.images, train.labels)
  found = {"train": dict(fingerprints.config_fingerprint(config, config.data.train_split,
                                                         decoded),
                         split=config.data.train_split)}
  for name, split in evaluation.final_splits(config):
    found[name] = dict(fingerprints.config_fingerprint(config, split), split=split)
  return found


def write_results(run: setup.Run, scores: dict, log_prefix: str = "",
                  data: Optional[dict] = None, inference: Optional[dict] = None) -> dict:
  """Logs the run's ``scores`` ({"val": evaluate(...), ...}), exports the task
  (``config.export``) and writes results.json (with the splits' fingerprints
  ``data``, if given, and with ``eval.costs`` the run's costs, ``inference``
  the measured forward if already measured); returns what it wrote."""
  params = run.state["params"]
  results = {"method": run.config.method, "step": run.step,
             "trainable_params": freezing.count(freezing.split(params, run.labels)[0]),
             "total_params": freezing.count(trees.flatten(params)),
             "backbone_params": backbone_size(
                 params, registry.get_method(run.config.method).fresh_patterns)}
  for name, score in scores.items():
    saved = score.pop("predictions", None)
    results[name] = score
    run.writer.write(run.step, score, prefix=f"{name}/")
    run.writer.print(f"{log_prefix}{name} top-1 {score['top1']:.4f}, top-5 "
                     f"{score['top5']:.4f} ({score['count']} images)")
    if saved is not None and name == "test" and jax.process_index() == 0:
      results[name] = dict(score, predictions=predictions.write(run.workdir, name, saved))
  if data is not None:
    results["data"] = data
  if run.config.export.enabled:
    results["export"] = export(run)
    if run.config.export.format != "npz" and results["export"]:
      results["standalone_export"] = os.path.join(results["export"], run.config.export.format)
  if run.config.eval.costs:
    results["cost"] = costs.run_costs(run, results.get("export"), inference)
  if run.config.export.merged:
    results["export_merged"] = export_merged(run)
  if jax.process_index() == 0:
    with tf.io.gfile.GFile(os.path.join(run.workdir, RESULTS_FILE), "w") as f:
      json.dump(results, f, indent=2)
  return results


def export(run: setup.Run) -> Optional[str]:
  """Writes the task export of the run's current parameters (process 0), and from it
  the standalone one of ``config.export.format`` in ``export/<format>/``; returns
  the task export's directory."""
  if jax.process_index() != 0:
    return None
  directory = task_export.export_task(
      os.path.join(run.workdir, "export"), run.state["params"], run.labels, spec=run.spec,
      num_classes=run.data.num_classes, class_names=run.data.class_names,
      normalization=run.norm, backbone_path=run.config.model.init_checkpoint or None,
      backbone_fingerprint=run.fingerprint, init_seed=run.config.seed,
      batch_stats=run.state.get("batch_stats"))
  settings = run.config.export
  if settings.format != "npz":
    standalone.export_task(directory, os.path.join(directory, settings.format),
                           export_format=settings.format, batch_size=settings.batch_size,
                           platforms=settings.platforms,
                           backbone_path=run.config.model.init_checkpoint or None)
  return directory


def export_merged(run: setup.Run) -> Optional[str]:
  """Writes the merged backbone and its linear task export (process 0, ``export.merging``)."""
  if jax.process_index() != 0:
    return None
  return merging.export_merged(
      os.path.join(run.workdir, "export_merged"), run.state["params"], spec=run.spec,
      num_classes=run.data.num_classes, class_names=run.data.class_names,
      normalization=run.norm, init_seed=run.config.seed)
