"""Per-task exports: the trainable parameters plus JSON metadata, never pickle.

An export holds what one task adds to a shared backbone: prompts, head and any
method parameters (``task.npz``; BatchNorm running averages of MLP-k heads as
``batch_stats/<path>``), and what is needed to use them
(``task.json``): the model spec, classes, image size, normalisation and the
sha256 fingerprint of the backbone file. Loading = backbone file + export; a
backbone whose fingerprint differs is refused.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from vpt_jax import errors
from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.params import freezing
from vpt_jax.params import trees

FORMAT = "vpt_jax.task_export"
FORMAT_VERSION = 1
PARAMS_FILE = "task.npz"
METADATA_FILE = "task.json"
BATCH_STATS_PREFIX = "batch_stats/"


class ExportError(errors.UserError):
  """An export that is missing, malformed or does not fit the backbone."""


def write_atomically(path: str, data: Union[str, bytes]) -> None:
  """Writes ``data`` (text or bytes) to ``path`` through a temporary file and a rename
  (no half-written file)."""
  temporary = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(temporary, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  tf.io.gfile.rename(temporary, path, overwrite=True)


# The fix for a broken export: write it again from the run that made it.
_REEXPORT = ("write it again from its run: run.py --mode export with the run's --config and "
             "--workdir")


def _write_both(directory: str, arrays: dict, metadata: dict) -> None:
  """Writes ``PARAMS_FILE`` and ``METADATA_FILE`` under temporary names, then renames both.

  Nothing is renamed before both files are complete, so a failing or full disk
  while writing leaves the previous export as it was; ``metadata`` gets the
  parameters file's sha256 (``read_export`` checks it).
  """
  params_path = os.path.join(directory, PARAMS_FILE)
  metadata_path = os.path.join(directory, METADATA_FILE)
  staged = {path: f"{path}.tmp-{os.getpid()}" for path in (params_path, metadata_path)}
  try:
    npz_lib.save_npz(arrays, staged[params_path])
    metadata = {**metadata, "params_sha256": npz_lib.fingerprint(staged[params_path])}
    with tf.io.gfile.GFile(staged[metadata_path], "w") as f:
      f.write(json.dumps(metadata, indent=2, sort_keys=True))
    for final, temporary in staged.items():  # the parameters first, the metadata last
      tf.io.gfile.rename(temporary, final, overwrite=True)
  except (OSError, tf.errors.OpError) as e:
    raise ExportError(f"could not write the export in {directory}: {str(e).splitlines()[0]}; "
                      "the previous export there is intact; free space or fix the disk and "
                      "rerun (or run.py --mode export)") from e
  finally:
    for temporary in staged.values():
      if tf.io.gfile.exists(temporary):
        tf.io.gfile.remove(temporary)


def export_task(directory: str, params, labels, *, spec: dict, num_classes: int,
                class_names: Optional[Sequence[str]], normalization: dict,
                backbone_path: Optional[str], backbone_fingerprint: Optional[str],
                init_seed: int, extra: Optional[dict] = None,
                batch_stats: Optional[dict] = None) -> str:
  """Writes ``directory/task.npz`` and ``directory/task.json``; returns the directory.

  Args:
    params: the whole parameter tree; only leaves labelled "train" are written.
    labels: "train"/"frozen" tree of the same structure.
    spec: ``factory.model_spec`` of the model.
    normalization: {"mean": [3], "std": [3]} the inputs were normalised with.
    backbone_path, backbone_fingerprint: the backbone file and its sha256, or
      None for a model trained from scratch (its frozen leaves, if any, are
      rebuilt from ``init_seed``).
    batch_stats: the model's BatchNorm running averages, if it has any; stored
      as ``batch_stats/<path>`` and listed under "batch_stats" in the metadata.
  Both files are renamed into place only when both are complete, so a failing
  or full disk leaves the previous export intact; the metadata records the
  parameters file's sha256, so a parameters file from another save (a crash
  between the two renames) is refused when read.
  """
  trainable, _ = freezing.split(params, labels)
  stats = trees.flatten(batch_stats or {})
  tf.io.gfile.makedirs(directory)
  arrays = {**trainable, **{BATCH_STATS_PREFIX + k: v for k, v in stats.items()}}
  metadata = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "model": spec, "num_classes": int(num_classes),
      "class_names": list(class_names) if class_names else None,
      "image_size": int(spec["image_size"]),
      "normalization": {k: [float(x) for x in v] for k, v in normalization.items()},
      "backbone": {"path": backbone_path, "sha256": backbone_fingerprint},
      "init_seed": int(init_seed),
      "trainable_params": int(freezing.count(trainable)),
      "params": sorted(trainable),
      **({"batch_stats": sorted(stats)} if stats else {}),
      **(extra or {}),
  }
  _write_both(directory, {k: np.asarray(jax.device_get(v)) for k, v in arrays.items()},
              metadata)
  return directory


def read_export(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns (metadata, flat trainable params) of an export, validated.

  BatchNorm running averages, if the export has any, are included under their
  ``batch_stats/`` keys (see ``split_batch_stats``).
  """
  metadata_path = os.path.join(directory, METADATA_FILE)
  if not tf.io.gfile.exists(metadata_path):
    raise ExportError(f"No task export at {directory!r}: {METADATA_FILE} is missing. "
                      "Point to a directory written by `run.py` (WORKDIR/export).")
  try:
    with tf.io.gfile.GFile(metadata_path) as f:
      metadata = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ExportError(f"{metadata_path} is damaged (not JSON: {e}); {_REEXPORT}") from e
  if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
    raise ExportError(f"{metadata_path} is not a {FORMAT} v{FORMAT_VERSION} export")
  params_path = os.path.join(directory, PARAMS_FILE)
  try:
    flat = npz_lib.read_npz(params_path)
  except npz_lib.CheckpointNotFoundError as e:
    raise ExportError(f"{params_path} is missing; the export is incomplete: "
                      f"{_REEXPORT}") from e
  except npz_lib.CheckpointError as e:
    raise ExportError(f"{params_path} is damaged (not a readable .npz); {_REEXPORT}") from e
  recorded = metadata.get("params_sha256")  # exports before this check have none
  if recorded and npz_lib.fingerprint(params_path) != recorded:
    raise ExportError(f"{params_path} is not the file {METADATA_FILE} was written with "
                      f"(sha256 differs: damaged, edited or from another save); {_REEXPORT}")
  listed = metadata["params"] + [BATCH_STATS_PREFIX + k for k in metadata.get("batch_stats", [])]
  if sorted(flat) != sorted(listed):
    raise ExportError(f"{directory}: {PARAMS_FILE} does not hold the parameters "
                      f"{METADATA_FILE} lists; the export is incomplete or was edited")
  return metadata, flat


def class_names(metadata: dict) -> list[str]:
  """An export's class names; the class ids as strings if it recorded none."""
  return metadata.get("class_names") or [str(i) for i in range(metadata["num_classes"])]


def fresh_patterns(spec: dict, exported) -> tuple[str, ...]:
  """Regexes of the parameters not read from the backbone file.

  The method's own parameters are never in the backbone file; the exported
  ones (which include every trained backbone parameter) come from the export.
  """
  method = registry.get_method(spec["method"])
  return method.fresh_patterns + tuple(re.escape(p) for p in exported)


def split_batch_stats(flat: dict) -> tuple[dict, dict]:
  """An export's flat arrays -> (params, batch_stats) flat dicts."""
  params = {k: v for k, v in flat.items() if not k.startswith(BATCH_STATS_PREFIX)}
  stats = {k[len(BATCH_STATS_PREFIX):]: v for k, v in flat.items()
           if k.startswith(BATCH_STATS_PREFIX)}
  return params, stats


def load_task(directory: str, backbone_path: Optional[str] = None, *,
              expected_method: Optional[str] = None):
  """Rebuilds a task: backbone file + export -> (model, params, metadata).

  For models with BatchNorm (MLP-k heads), whose running averages are not
  parameters, use ``load_task_variables``.

  Args:
    directory: the export directory.
    backbone_path: the backbone .npz (defaults to the path recorded at export).
    expected_method: if given, refuse an export of another method.

  Raises:
    ExportError: fingerprint mismatch, wrong method or malformed export.
  """
  model, variables, metadata = load_task_variables(directory, backbone_path,
                                                   expected_method=expected_method)
  return model, variables["params"], metadata


def load_task_variables(directory: str, backbone_path: Optional[str] = None, *,
                        expected_method: Optional[str] = None):
  """Rebuilds a task: backbone file + export -> (model, variables, metadata).

  ``variables`` is what ``model.apply`` takes: {"params": ...} plus
  {"batch_stats": ...} for models with BatchNorm. Arguments and errors as
  ``load_task``.
  """
  metadata, flat = read_export(directory)
  flat, stats = split_batch_stats(flat)
  spec = metadata["model"]
  if expected_method is not None and spec["method"] != expected_method:
    raise ExportError(f"{directory} is a {spec['method']!r} export, not "
                      f"{expected_method!r}; export the task with that method")
  model = factory.build_model(spec, metadata["num_classes"])
  # Shapes first: every leaf should come from the backbone file or the export,
  # so the (for ViT-B, 86M-parameter) random initialisation is only computed if
  # some leaf is left over (no backbone file, or a fresh parameter kept frozen).
  variables = factory.variable_shapes(model, spec["image_size"])
  recorded = metadata["backbone"]
  if backbone_path and recorded["sha256"] is None:
    raise ExportError(
        f"{directory} was trained from scratch (no backbone file): its export holds every "
        f"parameter, so {backbone_path} would not be used; load it without backbone_path")
  backbone_path = backbone_path or recorded["path"]
  params = variables["params"]
  if recorded["sha256"] is not None:
    if not backbone_path:
      raise ExportError(f"{directory} needs its backbone file; pass backbone_path")
    found = npz_lib.fingerprint(backbone_path)
    if found != recorded["sha256"]:
      raise ExportError(
          f"Backbone mismatch: {directory} was trained on a backbone with sha256 "
          f"{recorded['sha256'][:16]}... ({recorded['path']}) but {backbone_path} has "
          f"{found[:16]}...; load it with the backbone it was trained on")
    params = factory.load_backbone_file(params, backbone_path, spec["variant"],
                                        fresh=fresh_patterns(spec, flat))
  variables["params"] = _replace(params, flat, directory, "parameter")
  if stats or "batch_stats" in variables:
    # Running averages are never initialised meaningfully: all must be exported.
    variables["batch_stats"] = _replace(variables.get("batch_stats", {}), stats, directory,
                                        "batch statistic", require_all=True)
  leftover = [p for p, v in trees.flatten(variables["params"]).items()
              if isinstance(v, jax.ShapeDtypeStruct)]
  if leftover:
    initial = trees.flatten(
        factory.init_variables(model, spec["image_size"], metadata["init_seed"])["params"])
    variables["params"] = trees.unflatten(
        {**trees.flatten(variables["params"]), **{p: initial[p] for p in leftover}})
  return model, variables, metadata


def _replace(tree, flat: dict, directory: str, what: str, require_all: bool = False) -> dict:
  """``tree`` with the leaves in ``flat`` replaced; every one must exist with its shape."""
  init_flat = trees.flatten(tree)
  for path, value in flat.items():
    if path not in init_flat or init_flat[path].shape != value.shape:
      raise ExportError(f"{directory}: {what} {path} {value.shape} does not fit the "
                        f"model ({init_flat.get(path, np.zeros(0)).shape})")
    init_flat[path] = jnp.asarray(value)
  missing = sorted(set(init_flat) - set(flat)) if require_all else []
  if missing:
    raise ExportError(f"{directory}: the export lacks the {what}s {missing}; re-export "
                      "the task from its checkpoint")
  return trees.unflatten(init_flat)
