"""The ``.npz`` checkpoint file: reading without unpickling, atomic writing, fingerprints.

Also home of the errors every checkpoint reader raises (``CheckpointError`` and
its subclasses), so that callers catch one family of exceptions whichever
reader (``.npz``, PyTorch zip, safetensors) or converter failed.

Paths are local or remote (``gs://`` and any other scheme ``tf.io.gfile``
knows); TensorFlow is only imported for remote ones. Keys are the flat
``/``-joined names the file stores; what they mean (which layout, which model
names) is for ``vit_layouts`` and ``merge``.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from vpt_jax import errors
from vpt_jax.checkpoints import hub
from vpt_jax.params.trees import unflatten

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "CorruptCheckpointError",
    "PickledCheckpointError", "UnknownLayoutError", "PositionEmbeddingError",
    "CheckpointMismatchError", "read_npz", "fingerprint", "save_npz", "open_for_reading",
]

_OFFICIAL_HINT = (
    "Official ViT checkpoints are at gs://vit_models/ (e.g. "
    "`gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .`, or "
    "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz); "
    "a gs:// path can also be passed directly.")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------
# Errors (shared by every reader and converter of ``vpt_jax.checkpoints``).


class CheckpointError(errors.UserError):
  """Base class of every checkpoint problem raised by the checkpoint readers."""


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


def exists(path: str) -> bool:
  """Whether ``path`` (local or remote) exists.

  Raises:
    CheckpointError: a remote path that cannot be reached (no network, no
      credentials), with the fix, instead of TensorFlow's HTTP error.
  """
  if not _is_remote(path):
    return os.path.exists(path)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    return tf.io.gfile.exists(path)
  except tf.errors.OpError as e:
    raise CheckpointError(
        f"cannot reach {path} ({e.message.splitlines()[0]}); check the network and "
        "credentials (gcloud auth application-default login), or copy the file to a local "
        "path and pass that") from e


def _check_exists(path: str) -> None:
  found = exists(path)
  is_dir = found and (_gfile().isdir(path) if _is_remote(path) else os.path.isdir(path))
  if not found:
    raise CheckpointNotFoundError(f"Checkpoint file not found: {path}. {_OFFICIAL_HINT}")
  if is_dir:
    raise CheckpointNotFoundError(
        f"Checkpoint path {path} is a directory; pass the .npz file itself. "
        f"{_OFFICIAL_HINT}")



def open_for_reading(path: str) -> BinaryIO:
  """A seekable binary file object for `path` (remote files are read into memory).

  Raises:
    CheckpointNotFoundError: the path does not exist or is a directory.
  """
  _check_exists(path)
  if _is_remote(path):
    # zipfile needs cheap random access; buffer remote objects once in memory.
    with _gfile().GFile(path, "rb") as f:
      return io.BytesIO(f.read())
  try:
    return open(path, "rb")
  except PermissionError as e:  # it exists: "not found" would mislead
    raise CheckpointError(f"Checkpoint file {path} exists but cannot be read ({e.strerror}); "
                          "give your user read permission (chmod a+r) or copy it") from e


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


def _read_member(archive: zipfile.ZipFile, name: str, path: str) -> np.ndarray:
  """One ``.npy`` member as an array; its header is checked before any data is read."""
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
      return np.lib.format.read_array(member, allow_pickle=False)
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


def _open_archive(f: BinaryIO, path: str) -> zipfile.ZipFile:
  """The zip archive of an open ``.npz`` file, or a CorruptCheckpointError saying why not."""
  head = f.read(8)
  f.seek(0)
  if not zipfile.is_zipfile(f):
    raise CorruptCheckpointError(
        f"{path} is not a valid .npz checkpoint: {_describe_non_zip(head)}. "
        f"Re-download it; {_OFFICIAL_HINT}")
  f.seek(0)
  try:
    return zipfile.ZipFile(f)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise CorruptCheckpointError(
        f"{path} is not a valid .npz checkpoint: the zip archive is damaged ({e}). "
        f"Re-download it; {_OFFICIAL_HINT}") from e


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
  with open_for_reading(path) as f, _open_archive(f, path) as archive:
    names = [info.filename for info in archive.infolist() if not info.is_dir()]
    foreign = [n for n in names if not n.endswith(".npy")]
    if foreign:
      torch_like = any(n.endswith(".pkl") for n in foreign)
      raise CorruptCheckpointError(
          f"{path} is not a valid .npz checkpoint: the zip holds non-.npy members "
          f"{sorted(foreign)[:5]}"
          + (" (it looks like a PyTorch checkpoint; convert it to .npz first)"
             if torch_like else "") + ".")
    return {name[:-len(".npy")]: _read_member(archive, name, path) for name in names}


# {(path, inode, size, mtime in ns): sha256}: a protocol runs dozens of runs on one backbone in
# one process, and hashing ViT-B/16's 330 MB costs 1-3 s each time (benchmarks/README.md).
_FINGERPRINTS: dict[tuple[str, int, int, int], str] = {}


def _file_identity(path: str) -> tuple[str, int, int, int]:
  """(absolute path or URL, inode, size, modification time in ns).

  ``save_npz`` replaces a file by renaming a new one over it (a new inode); a
  rewrite in place changes the size or the modification time.
  """
  if _is_remote(path):
    stat = _gfile().stat(path)
    return path, 0, stat.length, stat.mtime_nsec
  stat = os.stat(path)
  return os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns


def fingerprint(path: str) -> str:
  """sha256 hex digest of the file's bytes, read in 1 MiB chunks (local, gs:// or hf://).

  Remembered for the process, keyed by path, inode, size and modification time.
  """
  path = hub.local_path(os.fspath(path))
  _check_exists(path)
  identity = _file_identity(path)
  if identity not in _FINGERPRINTS:
    digest = hashlib.sha256()
    opener = _gfile().GFile if _is_remote(path) else open
    with opener(path, "rb") as f:
      while chunk := f.read(_CHUNK):
        digest.update(chunk)
    _FINGERPRINTS[identity] = digest.hexdigest()
  return _FINGERPRINTS[identity]


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
