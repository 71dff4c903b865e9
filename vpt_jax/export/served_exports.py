"""Task exports as a multi-task server reads them, and the ones it refuses.

A ``MultiTaskServer`` (``serving``) holds one backbone for all its tasks, so it
refuses, with a message naming the task:

* an export recorded with another backbone fingerprint than the served file,
  or trained without a backbone file (its frozen weights are random);
* an export that trained backbone weights other than biases (full,
  partial-k): sharing one copy of the backbone is the point; serve those
  alone (``predict.predict_files``). Exports that override only backbone
  biases (bias: BitFit, vpt+bias) or LayerNorm scales too (ln_tune, difffit)
  are served: these vectors become per-task leaves, gathered per example like
  prompts (about 0.4 MB per example for ViT-B/16's 103K biases);
* tasks of different image sizes or backbone variants in one server (one
  input array, one backbone): use one server per image size.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from vpt_jax import errors
from vpt_jax.export import task_export
from vpt_jax.methods import registry
from vpt_jax.methods.reparam_common import LAYER_NORM_PARAMS

PARAMS = "params"
BATCH_STATS = "batch_stats"


@dataclasses.dataclass(frozen=True)
class LoadedExport:
  """One export as read from disk: metadata and its variables.

  ``variables`` is flat, keyed "<collection>/<path>" ("params/vpt/deep",
  "batch_stats/head/batchnorm_0/mean").
  """
  name: str
  directory: str
  metadata: dict
  variables: dict[str, np.ndarray]

  @property
  def num_classes(self) -> int:
    return int(self.metadata["num_classes"])

  @property
  def class_names(self) -> list[str]:
    return task_export.class_names(self.metadata)


def read_task(name: str, directory: str) -> LoadedExport:
  """Reads an export (``task_export.read_export``) into a ``LoadedExport``."""
  metadata, flat = task_export.read_export(directory)
  params, stats = task_export.split_batch_stats(flat)
  variables = {**{f"{PARAMS}/{k}": v for k, v in params.items()},
               **{f"{BATCH_STATS}/{k}": v for k, v in stats.items()}}
  return LoadedExport(name, directory, metadata, variables)


def backbone_overrides(export: LoadedExport) -> list[str]:
  """Exported parameters that replace backbone-file parameters (sorted paths).

  A method's own parameters (``Method.fresh_patterns``: head, prompts,
  adapters, ...) are never in the backbone file; anything else it exported was
  a backbone weight it trained (bias vectors for BitFit, blocks for partial-k).
  """
  method = registry.get_method(export.metadata["model"]["method"])
  fresh = [re.compile(p) for p in method.fresh_patterns]
  prefix = f"{PARAMS}/"
  return sorted(k[len(prefix):] for k in export.variables if k.startswith(prefix)
                and not any(p.fullmatch(k[len(prefix):]) for p in fresh))


def check_servable(export: LoadedExport) -> None:
  """Raises ExportError if the export cannot share a backbone with other tasks."""
  recorded = export.metadata["backbone"]
  if recorded["sha256"] is None:
    raise task_export.ExportError(
        f"task {export.name!r} ({export.directory}) was trained without a backbone file, "
        "so its frozen weights are its own random initialisation and there is no shared "
        "backbone to serve it on; classify with it alone (predict.predict_files)")
  weights = [p for p in backbone_overrides(export)
             if p.rsplit("/", 1)[-1] != "bias" and not re.fullmatch(LAYER_NORM_PARAMS, p)]
  if weights:
    raise task_export.ExportError(
        f"task {export.name!r} ({export.directory}, method "
        f"{export.metadata['model']['method']!r}) trained backbone weights such as "
        f"{weights[0]} ({len(weights)} weights besides biases); a multi-task server holds "
        "one copy of the backbone for every task, so it serves only methods that add "
        "parameters or override backbone biases. Classify with this task alone "
        "(run.py --mode=predict --config.predict.export_dir=... or predict.predict_files)")


def check_task_names(names: Iterable[str]) -> None:
  """Raises ValueError for no tasks or a name the command line could not spell."""
  names = list(names)
  if not names:
    raise errors.UserError("a MultiTaskServer needs at least one task export: {name: directory}")
  for name in names:
    if not name or any(c in name for c in ",=:"):
      raise errors.UserError(f"task name {name!r} must be non-empty without ',', '=' or ':'")


def check_same(loaded: Sequence[LoadedExport], what: str,
               value: Callable[[LoadedExport], Any], why: str) -> None:
  """Raises ExportError, listing each task's ``value``, unless all tasks agree on it."""
  values = {e.name: value(e) for e in loaded}
  if len(set(values.values())) > 1:
    raise task_export.ExportError(f"tasks differ in {what}: {values}; {why}")


def check_backbone_fingerprints(loaded: Sequence[LoadedExport], backbone_path: str,
                                fingerprint: str) -> None:
  """Raises ExportError naming the first task trained on another backbone file."""
  for export in loaded:
    recorded = export.metadata["backbone"]["sha256"]
    if recorded != fingerprint:
      raise task_export.ExportError(
          f"Backbone mismatch: task {export.name!r} ({export.directory}) was trained on a "
          f"backbone with sha256 {recorded[:16]}... ({export.metadata['backbone']['path']}) "
          f"but the served backbone {backbone_path} has "
          f"{fingerprint[:16]}...; serve tasks of different backbones with "
          "separate servers")
