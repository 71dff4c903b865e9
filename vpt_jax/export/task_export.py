"""Per-task exports: the trainable parameters plus JSON metadata, never pickle.

An export holds what one task adds to a shared backbone: prompts, head and any
method parameters (``task.npz``), and what is needed to use them
(``task.json``): the model spec, classes, image size, normalisation and the
sha256 fingerprint of the backbone file. Loading = backbone file + export; a
backbone whose fingerprint differs is refused.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.models import factory
from vpt_jax.training import partition

FORMAT = "vpt_jax.task_export"
FORMAT_VERSION = 1
PARAMS_FILE = "task.npz"
METADATA_FILE = "task.json"


class ExportError(ValueError):
  """An export that is missing, malformed or does not fit the backbone."""


def _write_text_atomically(path: str, text: str) -> None:
  temporary = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(temporary, "w") as f:
    f.write(text)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def export_task(directory: str, params, labels, *, spec: dict, num_classes: int,
                class_names: Optional[Sequence[str]], normalization: dict,
                backbone_path: Optional[str], backbone_fingerprint: Optional[str],
                init_seed: int, extra: Optional[dict] = None) -> str:
  """Writes ``directory/task.npz`` and ``directory/task.json``; returns the directory.

  Args:
    params: the whole parameter tree; only leaves labelled "train" are written.
    labels: "train"/"frozen" tree of the same structure.
    spec: ``factory.model_spec`` of the model.
    normalization: {"mean": [3], "std": [3]} the inputs were normalised with.
    backbone_path, backbone_fingerprint: the backbone file and its sha256, or
      None for a model trained from scratch (its frozen leaves, if any, are
      rebuilt from ``init_seed``).
  The parameters are written first and the metadata last, each atomically, so
  a crash never leaves an export that loads.
  """
  trainable, _ = partition.split(params, labels)
  tf.io.gfile.makedirs(directory)
  npz_lib.save_npz({k: np.asarray(jax.device_get(v)) for k, v in trainable.items()},
                   os.path.join(directory, PARAMS_FILE))
  metadata = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "model": spec, "num_classes": int(num_classes),
      "class_names": list(class_names) if class_names else None,
      "image_size": int(spec["image_size"]),
      "normalization": {k: [float(x) for x in v] for k, v in normalization.items()},
      "backbone": {"path": backbone_path, "sha256": backbone_fingerprint},
      "init_seed": int(init_seed),
      "trainable_params": int(partition.count(trainable)),
      "params": sorted(trainable),
      **(extra or {}),
  }
  _write_text_atomically(os.path.join(directory, METADATA_FILE),
                         json.dumps(metadata, indent=2, sort_keys=True))
  return directory


def read_export(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Returns (metadata, flat trainable params) of an export, validated."""
  metadata_path = os.path.join(directory, METADATA_FILE)
  if not tf.io.gfile.exists(metadata_path):
    raise ExportError(f"No task export at {directory!r}: {METADATA_FILE} is missing. "
                      "Point to a directory written by `run.py` (WORKDIR/export).")
  with tf.io.gfile.GFile(metadata_path) as f:
    metadata = json.load(f)
  if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
    raise ExportError(f"{metadata_path} is not a {FORMAT} v{FORMAT_VERSION} export")
  flat = npz_lib.read_npz(os.path.join(directory, PARAMS_FILE))
  if sorted(flat) != sorted(metadata["params"]):
    raise ExportError(f"{directory}: {PARAMS_FILE} does not hold the parameters "
                      f"{METADATA_FILE} lists; the export is incomplete or was edited")
  return metadata, flat


def load_task(directory: str, backbone_path: Optional[str] = None, *,
              expected_method: Optional[str] = None):
  """Rebuilds a task: backbone file + export -> (model, params, metadata).

  Args:
    directory: the export directory.
    backbone_path: the backbone .npz (defaults to the path recorded at export).
    expected_method: if given, refuse an export of another method.

  Raises:
    ExportError: fingerprint mismatch, wrong method or malformed export.
  """
  metadata, flat = read_export(directory)
  spec = metadata["model"]
  if expected_method is not None and spec["method"] != expected_method:
    raise ExportError(f"{directory} is a {spec['method']!r} export, not "
                      f"{expected_method!r}; export the task with that method")
  model = factory.build_model(spec, metadata["num_classes"])
  size = spec["image_size"]
  init_fn = lambda: model.init(jax.random.key(metadata["init_seed"]),
                               jnp.zeros((1, size, size, 3), jnp.float32))["params"]
  recorded = metadata["backbone"]
  backbone_path = backbone_path or recorded["path"]
  params = jax.jit(init_fn)()
  if recorded["sha256"] is not None:
    if not backbone_path:
      raise ExportError(f"{directory} needs its backbone file; pass backbone_path")
    found = npz_lib.fingerprint(backbone_path)
    if found != recorded["sha256"]:
      raise ExportError(
          f"Backbone mismatch: {directory} was trained on a backbone with sha256 "
          f"{recorded['sha256'][:16]}... ({recorded['path']}) but {backbone_path} has "
          f"{found[:16]}...; load it with the backbone it was trained on")
    params = npz_lib.load_backbone(params, backbone_path,
                                   fresh=tuple(re.escape(p) for p in flat))
  init_flat = partition.flatten(params)
  for path, value in flat.items():
    if path not in init_flat or init_flat[path].shape != value.shape:
      raise ExportError(f"{directory}: parameter {path} {value.shape} does not fit the "
                        f"model ({init_flat.get(path, np.zeros(0)).shape})")
    init_flat[path] = jnp.asarray(value)
  return model, partition.unflatten(init_flat), metadata
