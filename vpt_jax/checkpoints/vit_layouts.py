"""The official ViT checkpoint layouts, converted to the model's parameter names.

Three on-disk layouts are understood (see `detect_layout`):

* ``vit_raw``: the google-research/vision_transformer releases
  (e.g. gs://vit_models/imagenet21k/ViT-B_16.npz). Flat `/`-joined keys with
  pre-Linen auto-names: within one parent scope a single counter ran across all
  submodule types, so a block holds ``LayerNorm_0``,
  ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``.
* ``vit_linen``: the same names after Linen renumbering (one counter per type:
  ``LayerNorm_0``, ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``,
  ``MlpBlock_0``); what this library's own model writes.
* ``big_vision``: keys under ``params/``; the position embedding is the
  top-level ``pos_embedding`` of shape (1, N, D) with no class-token row (it is
  added to the patches before CLS is concatenated); blocks either unrolled
  (``Transformer/encoderblock_{i}/...``) or scanned (``Transformer/encoderblock/
  ...`` with a leading depth axis).

An ``opt/target/`` prefix (old vision_transformer training checkpoints) is
tolerated in every layout. The model layout everything is converted to is the
Linen one, with ``Transformer/posembed_input/pos_embedding`` of shape
(1, 1 + N, D) including the class-token row.

When the model's image size differs from the checkpoint's, `resample_posemb`
resizes the position embedding's grid (``merge.merge_backbone`` calls it).

Nothing here imports the model: conversion works on flat dicts of arrays, so
any module that follows the naming loads (``merge`` puts the arrays into the
model's parameter tree).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import scipy.ndimage

from vpt_jax import errors
from vpt_jax.checkpoints.npz import CorruptCheckpointError
from vpt_jax.checkpoints.npz import PositionEmbeddingError
from vpt_jax.checkpoints.npz import UnknownLayoutError
from vpt_jax.checkpoints.npz import read_npz
from vpt_jax.params.trees import flatten, unflatten

__all__ = ["LAYOUTS", "POSEMB_KEY", "detect_layout", "to_model_layout", "read_model_layout",
           "model_layout", "resample_posemb"]

LAYOUTS = ("vit_raw", "vit_linen", "big_vision")
POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
# Classifier parts of the released files; dropped on conversion, never an error.
_DROPPED_PREFIXES = ("head/", "pre_logits/")
_CONTAINER_PREFIXES = ("opt/target/", "params/")

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Layouts.

# Module auto-names: a class name (upper case first) and an index, e.g.
# "MlpBlock_3"; explicit names such as "encoderblock_3" are lower case.
_AUTO_NAME = re.compile(r"([A-Z]\w*?)_(\d+)")
_UNROLLED_BLOCK = re.compile(r"Transformer/encoderblock_\d+/")
_SCANNED_BLOCK_PREFIX = "Transformer/encoderblock/"


def _strip_container(flat: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """Returns (prefix, params) with an ``opt/target/`` or ``params/`` prefix removed.

  Keys outside the prefix (optimizer state, step counters) are discarded.
  """
  for prefix in _CONTAINER_PREFIXES:
    if any(key.startswith(prefix) for key in flat):
      return prefix, {key[len(prefix):]: value for key, value in flat.items()
                      if key.startswith(prefix)}
  return "", dict(flat)


def _renumber_pre_linen(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Renames pre-Linen auto-names to Linen ones, recursively.

  Pre-Linen numbered all submodules of one parent with one counter in creation
  order (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3);
  Linen counts per type. Creation order per type is the old index order, so
  within each parent every type's children are re-indexed 0, 1, ... by their
  old index. Explicit (lower-case) names are kept.
  """
  by_type: dict[str, list[tuple[int, str]]] = {}
  renamed: dict[str, Any] = {}
  for name in tree:
    match = _AUTO_NAME.fullmatch(name)
    if match:
      by_type.setdefault(match.group(1), []).append((int(match.group(2)), name))
    else:
      renamed[name] = tree[name]
  for type_name, indexed in by_type.items():
    for rank, (_, name) in enumerate(sorted(indexed)):
      renamed[f"{type_name}_{rank}"] = tree[name]
  return {name: _renumber_pre_linen(value) if isinstance(value, Mapping) else value
          for name, value in renamed.items()}


def _renumbered(params: Mapping[str, Any]) -> dict[str, Any]:
  """Flat pre-Linen names -> flat Linen names (see `_renumber_pre_linen`)."""
  try:
    return flatten(_renumber_pre_linen(unflatten(params)))
  except ValueError as e:  # e.g. "a//b", or a key that is both leaf and parent
    raise CorruptCheckpointError(f"checkpoint keys are malformed: {e}") from e


def _top_level_names(flat: Iterable[str]) -> list[str]:
  return sorted({key.split("/", 1)[0] for key in flat})


def detect_layout(flat: Mapping[str, Any]) -> str:
  """Names the layout of a checkpoint's flat keys: one of `LAYOUTS`.

  Detection is by key structure: a top-level ``pos_embedding`` or scanned
  ``Transformer/encoderblock/`` means big_vision (so does a ``params/`` file with
  blocks but no ``Transformer/posembed_input``, e.g. a sincos-posemb model);
  otherwise ``Transformer/encoderblock_{i}`` or ``Transformer/posembed_input``
  means a vision_transformer file, raw if Linen renumbering changes any name.

  Raises:
    UnknownLayoutError: nothing matches; the message lists the top-level names.
  """
  prefix, params = _strip_container(flat)
  unrolled = any(_UNROLLED_BLOCK.match(key) for key in params)
  scanned = any(key.startswith(_SCANNED_BLOCK_PREFIX) for key in params)
  if scanned or "pos_embedding" in params or (
      prefix == "params/" and unrolled and POSEMB_KEY not in params):
    return "big_vision"
  if unrolled or POSEMB_KEY in params:
    return "vit_linen" if _renumbered(params).keys() == params.keys() else "vit_raw"
  raise UnknownLayoutError(
      "Unrecognised checkpoint layout: expected ViT keys such as "
      "'Transformer/encoderblock_0/...' (vision_transformer), "
      "'params/Transformer/encoderblock_0/...' or 'params/pos_embedding' "
      f"(big_vision), optionally under 'opt/target/'. Top-level names found"
      f"{' under ' + repr(prefix) if prefix else ''}: {_top_level_names(params)[:20]}. "
      f"Is this a ViT checkpoint? (A two-tower big_vision file keeps the image "
      f"tower under 'params/img/'; re-save that subtree on its own.)")


def _unstack_scanned(params: dict[str, Any]) -> dict[str, Any]:
  """Transformer/encoderblock/x (L, ...) -> Transformer/encoderblock_{i}/x (...)."""
  scanned = {key[len(_SCANNED_BLOCK_PREFIX):]: np.asarray(value)
             for key, value in params.items() if key.startswith(_SCANNED_BLOCK_PREFIX)}
  if not scanned:
    return params
  if any(_UNROLLED_BLOCK.match(key) for key in params):
    raise UnknownLayoutError("checkpoint has both scanned 'Transformer/encoderblock/' and "
                             "unrolled 'Transformer/encoderblock_{i}/' blocks")
  depths = {value.shape[0] if value.ndim else None for value in scanned.values()}
  if len(depths) != 1 or None in depths:
    raise CorruptCheckpointError(
        "scanned blocks 'Transformer/encoderblock/...' must share one leading depth "
        f"axis; found leading sizes {sorted(map(str, depths))}")
  (depth,) = depths
  out = {key: value for key, value in params.items()
         if not key.startswith(_SCANNED_BLOCK_PREFIX)}
  for rest, value in scanned.items():
    for layer in range(depth):
      out[f"Transformer/encoderblock_{layer}/{rest}"] = value[layer]
  return out


def to_model_layout(flat: Mapping[str, Any], layout: str) -> dict[str, np.ndarray]:
  """Converts a checkpoint's flat arrays to the model's (Linen) names.

  * ``opt/target/`` and ``params/`` prefixes are removed (keys outside them too);
  * ``head/*`` and ``pre_logits/*`` are dropped (a new task needs a new head);
  * vit_raw: pre-Linen auto-names renumbered per type (`_renumber_pre_linen`);
  * big_vision: scanned blocks unstacked; ``pos_embedding`` (1, N, D) moved to
    ``Transformer/posembed_input/pos_embedding`` with a zero class row
    prepended -> (1, 1 + N, D). big_vision adds no position embedding to CLS,
    so ``cls + 0`` reproduces its math exactly; ``cls`` is kept as is.

  Args:
    flat: {key: array} as returned by `read_npz`.
    layout: one of `LAYOUTS` (usually from `detect_layout`).

  Returns:
    {model key: array}.
  """
  if layout not in LAYOUTS:
    raise errors.UserError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
  _, params = _strip_container(flat)
  params = {key: value for key, value in params.items()
            if not key.startswith(_DROPPED_PREFIXES)}
  if layout == "vit_raw":
    params = _renumbered(params)
  elif layout == "big_vision":
    params = _unstack_scanned(params)
    if "pos_embedding" in params:
      posemb = np.asarray(params.pop("pos_embedding"))
      if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise CorruptCheckpointError(
            f"big_vision pos_embedding must have shape (1, N, D), got {posemb.shape}")
      class_row = np.zeros((1, 1, posemb.shape[2]), posemb.dtype)
      params[POSEMB_KEY] = np.concatenate([class_row, posemb], axis=1)
  return params


def read_model_layout(path: str) -> tuple[dict[str, np.ndarray], str]:
  """A ViT ``.npz`` in any known layout -> ({model key: array}, how to name it)."""
  path = os.fspath(path)
  return model_layout(read_npz(path), path)


def model_layout(raw: dict[str, np.ndarray], path: str) -> tuple[dict[str, np.ndarray], str]:
  """The arrays ``raw`` of the ViT ``.npz`` at ``path`` -> ({model key: array}, its name).

  Detects the file's layout (`detect_layout`) and converts the names
  (`to_model_layout`); the name says which layout it was.
  """
  layout = detect_layout(raw)
  converted = to_model_layout(raw, layout)
  logger.info("Loading %s (layout %s, %d arrays)", path, layout, len(converted))
  return converted, f"{path} (layout {layout})"


# ----------------------------------------------------------------------------
# Position embeddings.


def _square_side(num_tokens: int, what: str, has_class_token: bool) -> int:
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    below, above = side * side, (side + 1) * (side + 1)
    other = ("without" if has_class_token else "with")
    raise PositionEmbeddingError(
        f"cannot resample the position embedding: the {what} has {num_tokens} "
        f"patch tokens (after removing {int(has_class_token)} class-token row), "
        f"not a square grid (nearest squares {below} and {above}). Check "
        f"has_class_token (try {other} a class-token row) and that the image "
        f"size is a multiple of the patch size.")
  return side


def resample_posemb(posemb: np.ndarray, new_num_tokens: int,
                    has_class_token: bool) -> np.ndarray:
  """Bilinearly resizes a square-grid position embedding.

  (1, n_old, D) -> (1, new_num_tokens, D). With ``has_class_token`` the first
  row is the class token's and is kept unchanged. The grid is resized with
  ``scipy.ndimage.zoom(order=1)`` (corner-aligned bilinear), as the
  vision_transformer and big_vision loaders do, computed in float64 and cast
  back to the input dtype.

  Raises:
    PositionEmbeddingError: bad rank, or a token count that is not a square.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise PositionEmbeddingError(
        f"position embedding must have shape (1, tokens, D), got {posemb.shape}")
  num_extra = 1 if has_class_token else 0
  if posemb.shape[1] == new_num_tokens:
    return posemb.copy()
  if posemb.shape[1] <= num_extra or new_num_tokens <= num_extra:
    raise PositionEmbeddingError(
        f"cannot resample a position embedding of {posemb.shape[1]} tokens to "
        f"{new_num_tokens} with has_class_token={has_class_token}: no patch rows")
  class_rows, grid = posemb[:, :num_extra], posemb[0, num_extra:]
  old_side = _square_side(grid.shape[0], "checkpoint", has_class_token)
  new_side = _square_side(new_num_tokens - num_extra, "model", has_class_token)
  grid = grid.reshape(old_side, old_side, -1).astype(np.float64)
  factor = new_side / old_side
  grid = scipy.ndimage.zoom(grid, (factor, factor, 1), order=1)
  if grid.shape[:2] != (new_side, new_side):  # zoom rounds the output size
    raise PositionEmbeddingError(f"zoom produced {grid.shape[:2]}, expected "
                                 f"{(new_side, new_side)}")
  grid = grid.reshape(1, new_side * new_side, -1).astype(posemb.dtype)
  return np.concatenate([class_rows, grid], axis=1)
