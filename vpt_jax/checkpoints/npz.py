"""Loading the official ViT `.npz` checkpoints onto a parameter tree.

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

Nothing here imports the model: the loader works on nested dicts of arrays, so
any module that follows the naming loads, and new modules (prompts, heads,
adapters, ...) are declared ``fresh`` by the caller.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
import scipy.ndimage

from vpt_jax.params.trees import flatten, unflatten

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "CorruptCheckpointError",
    "PickledCheckpointError", "UnknownLayoutError", "PositionEmbeddingError",
    "CheckpointMismatchError", "LAYOUTS", "DEFAULT_FRESH", "POSEMB_KEY",
    "read_npz", "detect_layout", "to_model_layout", "resample_posemb",
    "merge_backbone", "load_backbone", "fingerprint", "save_npz",
    "flatten", "unflatten",
]

LAYOUTS = ("vit_raw", "vit_linen", "big_vision")
# Parameters that never come from a backbone file unless the caller says otherwise.
DEFAULT_FRESH = (r"head/.*", r"vpt/.*")
POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
# Classifier parts of the released files; dropped on conversion, never an error.
_DROPPED_PREFIXES = ("head/", "pre_logits/")
_CONTAINER_PREFIXES = ("opt/target/", "params/")
_OFFICIAL_HINT = (
    "Official ViT checkpoints are at gs://vit_models/ (e.g. "
    "`gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .`, or "
    "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz); "
    "a gs:// path can also be passed directly.")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """Base class of every checkpoint problem raised by this module."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint path does not exist (also a FileNotFoundError)."""


class CorruptCheckpointError(CheckpointError):
  """The file is not a readable .npz (not a zip, truncated, damaged member)."""


class PickledCheckpointError(CheckpointError):
  """The .npz holds object arrays; loading them would run pickle, so we refuse."""


class UnknownLayoutError(CheckpointError):
  """The keys match none of the supported checkpoint layouts."""


class PositionEmbeddingError(CheckpointError):
  """A position embedding cannot be resampled (e.g. not a square grid)."""


class CheckpointMismatchError(CheckpointError):
  """The file's parameters do not match the model's (missing/unexpected/shape).

  Attributes:
    missing: sorted model keys absent from the file.
    unexpected: sorted file keys the model does not have.
    mismatched: sorted (key, file_shape, model_shape) triples.
  """

  def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
    super().__init__(message)
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)


# ----------------------------------------------------------------------------
# File access: local paths directly, anything with a scheme through tf.io.gfile.


def _is_remote(path: str) -> bool:
  return "://" in str(path)


def _gfile():
  # TensorFlow is imported lazily: it is slow to import and only needed for
  # gs:// (and other remote) paths.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def _check_exists(path: str) -> None:
  if _is_remote(path):
    gfile = _gfile()
    exists = gfile.exists(path)
    is_dir = exists and gfile.isdir(path)
  else:
    exists, is_dir = os.path.exists(path), os.path.isdir(path)
  if not exists:
    raise CheckpointNotFoundError(f"Checkpoint file not found: {path}. {_OFFICIAL_HINT}")
  if is_dir:
    raise CheckpointNotFoundError(
        f"Checkpoint path {path} is a directory; pass the .npz file itself. "
        f"{_OFFICIAL_HINT}")


def _open_for_reading(path: str) -> BinaryIO:
  """A seekable binary file object for `path` (remote files are read into memory)."""
  _check_exists(path)
  if _is_remote(path):
    # zipfile needs cheap random access; buffer remote objects once in memory.
    with _gfile().GFile(path, "rb") as f:
      return io.BytesIO(f.read())
  return open(path, "rb")


# ----------------------------------------------------------------------------
# Reading.


def _read_member_header(member: BinaryIO) -> np.dtype:
  """Returns the dtype recorded in one .npy member's header."""
  version = np.lib.format.read_magic(member)
  if version == (1, 0):
    _, _, dtype = np.lib.format.read_array_header_1_0(member)
  else:
    # Versions 2.0 and 3.0 share the header layout (3.0 only allows utf-8 names).
    _, _, dtype = np.lib.format.read_array_header_2_0(member)
  return dtype


def _describe_non_zip(head: bytes) -> str:
  if head.startswith(_NPY_MAGIC):
    return "it is a single .npy array, not an .npz archive"
  if head[:1] == b"\x80":
    return "it looks like a Python pickle, which is never unpickled here"
  if head.startswith(_ZIP_MAGIC):
    return "it starts like a zip archive but its directory is missing (truncated download?)"
  if head.startswith(b"\x89HDF"):
    return "it is an HDF5 file"
  return "it is not a zip archive (truncated or corrupt?)"


def read_npz(path: str) -> dict[str, np.ndarray]:
  """Reads every array of an .npz checkpoint without ever unpickling.

  Args:
    path: a local path or a remote one such as ``gs://vit_models/...``.

  Returns:
    {key: array} with the file's flat `/`-joined keys (the ``.npy`` suffix of the
    zip members removed).

  Raises:
    CheckpointNotFoundError: the path does not exist.
    CorruptCheckpointError: not an .npz, truncated, or a damaged member.
    PickledCheckpointError: a member holds Python objects (would need pickle).
  """
  path = os.fspath(path)
  with _open_for_reading(path) as f:
    head = f.read(8)
    f.seek(0)
    if not zipfile.is_zipfile(f):
      raise CorruptCheckpointError(
          f"{path} is not a valid .npz checkpoint: {_describe_non_zip(head)}. "
          f"Re-download it; {_OFFICIAL_HINT}")
    f.seek(0)
    try:
      archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise CorruptCheckpointError(
          f"{path} is not a valid .npz checkpoint: the zip archive is damaged ({e}). "
          f"Re-download it; {_OFFICIAL_HINT}") from e
    with archive:
      names = [info.filename for info in archive.infolist() if not info.is_dir()]
      foreign = [n for n in names if not n.endswith(".npy")]
      if foreign:
        torch_like = any(n.endswith(".pkl") for n in foreign)
        raise CorruptCheckpointError(
            f"{path} is not a valid .npz checkpoint: the zip holds non-.npy members "
            f"{sorted(foreign)[:5]}"
            + (" (it looks like a PyTorch checkpoint; convert it to .npz first)"
               if torch_like else "") + ".")
      arrays = {}
      for name in names:
        key = name[:-len(".npy")]
        try:
          with archive.open(name) as member:
            dtype = _read_member_header(member)
          if dtype.hasobject:
            raise PickledCheckpointError(
                f"{path}: array {key!r} has dtype {dtype} (Python objects). Loading it "
                f"would unpickle arbitrary code, so it is refused. Re-save the "
                f"checkpoint with numeric arrays only.")
          with archive.open(name) as member:
            arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
          raise CorruptCheckpointError(
              f"{path} is not a valid .npz checkpoint: member {key!r} is damaged "
              f"({e}). Re-download it; {_OFFICIAL_HINT}") from e
        except PickledCheckpointError:
          raise
        except ValueError as e:  # malformed .npy header or truncated data
          raise CorruptCheckpointError(
              f"{path} is not a valid .npz checkpoint: member {key!r} is not a valid "
              f".npy array ({e}). Re-download it; {_OFFICIAL_HINT}") from e
  return arrays


def fingerprint(path: str) -> str:
  """sha256 hex digest of the file's bytes, read in 1 MiB chunks (local or gs://)."""
  path = os.fspath(path)
  _check_exists(path)
  digest = hashlib.sha256()
  opener = _gfile().GFile if _is_remote(path) else open
  with opener(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


# ----------------------------------------------------------------------------
# Writing.


def _write_npz_to(fileobj: BinaryIO, flat: Mapping[str, np.ndarray]) -> None:
  # Written member by member (as np.savez does) so that no key can collide with
  # a keyword argument and pickling stays off.
  with zipfile.ZipFile(fileobj, mode="w", compression=zipfile.ZIP_STORED,
                       allowZip64=True) as archive:
    for key in sorted(flat):
      with archive.open(key + ".npy", mode="w", force_zip64=True) as member:
        np.lib.format.write_array(member, flat[key], allow_pickle=False)


def _as_flat(flat_or_tree: Mapping[str, Any]) -> dict[str, Any]:
  """Flattens a tree whose keys may already be `/`-joined paths (flat dicts too)."""
  flat: dict[str, Any] = {}

  def visit(node, prefix):
    for key, value in node.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        visit(value, path)
      elif path in flat:
        raise ValueError(f"parameter path {path!r} appears twice")
      else:
        flat[path] = value

  visit(flat_or_tree, "")
  unflatten(flat)  # raises if one path is both a leaf and a parent
  return flat


def save_npz(flat_or_tree: Mapping[str, Any], path: str) -> None:
  """Writes arrays as a flat `/`-keyed .npz, atomically.

  Args:
    flat_or_tree: {"a/b": array} or a nested dict of arrays (jax or numpy).
    path: destination, written exactly (no ".npz" is appended). Locally the
      file is written under a temporary name in the same directory and renamed,
      so readers never see a partial file. Remote (gs://) objects are uploaded
      in one piece, which object stores publish atomically.

  Raises:
    ValueError: an array has an object dtype (it could only be pickled) or a
      dtype .npy cannot describe (bfloat16 and other ml_dtypes).
  """
  path = os.fspath(path)
  flat = _as_flat(flat_or_tree)
  arrays = {}
  for key, value in flat.items():
    array = np.asarray(value)
    if array.dtype.hasobject:
      raise ValueError(f"cannot save {key!r}: object arrays would need pickle")
    descr = np.lib.format.dtype_to_descr(array.dtype)
    if np.lib.format.descr_to_dtype(descr) != array.dtype:
      # e.g. bfloat16 (ml_dtypes) is stored as raw bytes ('<V2') and would read
      # back as a void array.
      raise ValueError(f"cannot save {key!r}: dtype {array.dtype} has no .npy "
                       f"representation; cast it (e.g. to float32) first")
    arrays[key] = array
  if _is_remote(path):
    buffer = io.BytesIO()
    _write_npz_to(buffer, arrays)
    with _gfile().GFile(path, "wb") as f:
      f.write(buffer.getvalue())
    return
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".",
                                  suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      _write_npz_to(f, arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  finally:
    # After a successful rename the temporary is gone; after any failure
    # (including KeyboardInterrupt) it is removed here.
    if os.path.exists(tmp_path):
      os.remove(tmp_path)


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
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
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


# ----------------------------------------------------------------------------
# Merging into the model's parameters.


def _compile_patterns(patterns: Sequence[str], argument: str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    patterns = (patterns,)
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"invalid regex {pattern!r} in {argument}=: {e}") from e
  return compiled


def _matches(patterns: Sequence[re.Pattern], key: str) -> bool:
  return any(pattern.fullmatch(key) for pattern in patterns)


def _architecture(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Width/depth/etc. implied by ViT parameter shapes (entries only when found)."""
  shape = lambda key: tuple(np.shape(flat[key])) if key in flat else None
  arch: dict[str, Any] = {}
  if (kernel := shape("embedding/kernel")) and len(kernel) == 4:
    arch["width"] = kernel[3]
    arch["patch"] = f"{kernel[0]}x{kernel[1]}"
  blocks = {int(m.group(1)) for key in flat
            if (m := re.match(r"Transformer/encoderblock_(\d+)/", key))}
  if blocks:
    arch["depth"] = max(blocks) + 1
  query = shape("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
  if query and len(query) == 3:
    arch["heads"] = query[1]
  mlp = shape("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel")
  if mlp and len(mlp) == 2:
    arch["mlp_dim"] = mlp[1]
  if (posemb := shape(POSEMB_KEY)) and len(posemb) == 3:
    arch["tokens"] = posemb[1]
  return arch


def _format_arch(arch: Mapping[str, Any]) -> str:
  return ", ".join(f"{name} {value}" for name, value in arch.items()) or "unknown"


def _mismatch_message(source: str, missing, unexpected, mismatched, file_flat,
                      model_flat, has_cls: bool) -> str:
  lines = [f"Checkpoint {source} does not match the model's parameters:"]
  if missing:
    lines.append(f"  missing from the file ({len(missing)}):")
    lines += [f"    {key}" for key in missing]
  if unexpected:
    lines.append(f"  in the file but not in the model ({len(unexpected)}):")
    lines += [f"    {key}" for key in unexpected]
  if mismatched:
    lines.append(f"  shape mismatches ({len(mismatched)}):")
    lines += [f"    {key}: file {file_shape} vs model {model_shape}"
              + (f" ({reason})" if reason else "")
              for key, file_shape, model_shape, reason in mismatched]
  file_arch, model_arch = _architecture(file_flat), _architecture(model_flat)
  file_arch.pop("tokens", None)  # the token count is resampled, not a mismatch
  model_arch.pop("tokens", None)
  hints = []
  if file_arch != model_arch:
    hints.append(f"wrong variant? The file implies {_format_arch(file_arch)}; the "
                 f"model has {_format_arch(model_arch)}.")
  if has_cls and "cls" in missing:
    hints.append("The file has no class token (a big_vision model trained with "
                 "pool_type 'gap' or 'map'?); this model needs a 'tok' model.")
  if missing:
    hints.append("Parameters meant to start from their initialisation (prompts, "
                 "heads, adapters) belong in fresh=.")
  if unexpected:
    hints.append("File parameters the model should not use can be dropped with "
                 "ignore=.")
  if not hints:
    hints.append("Check the model configuration (variant, image size) against "
                 "the checkpoint.")
  lines.append("Hint: " + " ".join(hints))
  return "\n".join(lines)


def merge_backbone(init_params: Mapping[str, Any], file_params: Mapping[str, Any], *,
                   fresh: Sequence[str] = DEFAULT_FRESH, ignore: Sequence[str] = (),
                   source: str = "<arrays>") -> dict[str, Any]:
  """Puts checkpoint arrays (already in model layout) into a parameter tree.

  Args:
    init_params: nested params of the model (arrays or ShapeDtypeStructs); a
      Flax variables dict {"params": tree} is accepted and returned in kind.
    file_params: {model key: array}, e.g. from `to_model_layout`.
    fresh: regexes (re.fullmatch on `/`-joined paths) of model parameters that
      keep their init value; they are never read from the file, even if present,
      and file keys matching them are not reported as unexpected.
    ignore: regexes of file keys to drop silently (e.g. a big_vision MAPHead).
    source: how to name the checkpoint in error messages.

  Returns:
    A new nested dict shaped like ``init_params``: fresh leaves are the init
    values, every other leaf is the file's array (numpy, on the host) cast to the
    init leaf's dtype. The position embedding is resampled when only its token
    count differs (with a class-token row when the model has ``cls``).

  Raises:
    CheckpointMismatchError: listing every missing key, unexpected key and
      shape mismatch at once, sorted, with a hint.
  """
  wrapped = set(init_params) == {"params"} and isinstance(init_params["params"], Mapping)
  tree = init_params["params"] if wrapped else init_params
  fresh_patterns = _compile_patterns(fresh, "fresh")
  ignore_patterns = _compile_patterns(ignore, "ignore")
  model_flat = flatten(tree)
  file_flat = {key: value for key, value in file_params.items()
               if not _matches(ignore_patterns, key)}
  has_cls = "cls" in model_flat

  merged, missing, mismatched = {}, [], []
  for key, init_value in model_flat.items():
    if _matches(fresh_patterns, key):
      merged[key] = init_value
      continue
    if key not in file_flat:
      missing.append(key)
      continue
    value = np.asarray(file_flat[key])
    file_shape, want = value.shape, tuple(np.shape(init_value))
    dtype = getattr(init_value, "dtype", None)
    dtype = np.result_type(init_value) if dtype is None else dtype
    if value.shape != want:
      posemb_resizable = (key.endswith("pos_embedding") and value.ndim == 3
                          and len(want) == 3 and value.shape[::2] == want[::2])
      if not posemb_resizable:
        mismatched.append((key, value.shape, want, ""))
        continue
      try:
        value = resample_posemb(value, want[1], has_class_token=has_cls)
      except PositionEmbeddingError:
        extra = int(has_cls)
        mismatched.append((key, value.shape, want,
                           f"cannot resample: {value.shape[1] - extra} and "
                           f"{want[1] - extra} patch tokens must both be square grids"))
        continue
      logger.info("Resampled %s from %s to %s", key, file_shape, want)
    merged[key] = np.array(value, dtype=dtype)
  unexpected = sorted(key for key in file_flat
                      if key not in model_flat and not _matches(fresh_patterns, key))
  if missing or unexpected or mismatched:
    missing.sort()
    mismatched.sort(key=lambda item: item[0])
    raise CheckpointMismatchError(
        _mismatch_message(source, missing, unexpected, mismatched, file_flat,
                          model_flat, has_cls),
        missing, unexpected, [item[:3] for item in mismatched])
  result = unflatten(merged)
  return {"params": result} if wrapped else result


def load_backbone(init_params: Mapping[str, Any], path: str, *,
                  fresh: Sequence[str] = DEFAULT_FRESH,
                  ignore: Sequence[str] = ()) -> dict[str, Any]:
  """Loads a ViT checkpoint's backbone into a copy of ``init_params``, strictly.

  Reads the file (`read_npz`), detects its layout (`detect_layout`), converts the
  names (`to_model_layout`) and merges (`merge_backbone`): every parameter not
  matched by a ``fresh`` regex must come from the file with the right shape
  (the position embedding is resampled when only its token count differs).

  Args:
    init_params: the model's freshly initialised nested params (or {"params": ...}).
    path: local or gs:// path of the .npz.
    fresh: regexes (re.fullmatch) of parameters initialised, not loaded, e.g.
      add r"Transformer/encoderblock_\\d+/adapter/.*" for adapters.
    ignore: regexes of file keys (model names) to drop without error.

  Returns:
    The new nested params dict; loaded leaves are numpy arrays.

  Raises:
    CheckpointError subclasses: see `read_npz`, `detect_layout`, and
    CheckpointMismatchError for a readable key/shape diff.
  """
  converted, source = read_model_layout(path)
  return merge_backbone(init_params, converted, fresh=fresh, ignore=ignore, source=source)


def read_model_layout(path: str) -> tuple[dict[str, np.ndarray], str]:
  """A ViT ``.npz`` in any known layout -> ({model key: array}, how to name it).

  Reads the file (`read_npz`), detects its layout (`detect_layout`) and
  converts the names (`to_model_layout`); the name says which layout it was.
  """
  path = os.fspath(path)
  raw = read_npz(path)
  layout = detect_layout(raw)
  converted = to_model_layout(raw, layout)
  logger.info("Loading %s (layout %s, %d arrays)", path, layout, len(converted))
  return converted, f"{path} (layout {layout})"
