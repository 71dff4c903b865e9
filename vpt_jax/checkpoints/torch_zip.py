"""The zip archive ``torch.save`` writes since torch 1.6, read without running pickled code.

The archive (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``) holds
``<prefix>/data.pkl``, a pickle whose tensors point at raw storages
``<prefix>/data/<key>`` (in the byte order of ``<prefix>/byteorder``, little
endian without one). The pickle is read by ``torch_pickle``'s allowlisted
unpickler; the storages are read here, each checked against the element count
the pickle declares before any byte is used.
"""

from __future__ import annotations

import io
import pickle
import zipfile
import zlib
from typing import Any, BinaryIO, Callable

import numpy as np

from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import torch_pickle

__all__ = ["read_torch_zip"]


def _open_zip(f: BinaryIO, source: str) -> zipfile.ZipFile:
  """The zip archive of an open file that starts like one, or why it is not readable."""
  f.seek(0)
  if not zipfile.is_zipfile(f):
    raise npz.CorruptCheckpointError(
        f"{source} starts like a torch zip archive but its directory is missing "
        "(truncated download?); download it again")
  f.seek(0)
  try:
    return zipfile.ZipFile(f)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise npz.CorruptCheckpointError(f"{source}: the zip archive is damaged ({e})") from e


def _data_pkl(names: list[str], source: str) -> str:
  """The archive's one ``data.pkl`` member, or an error naming what the zip is instead."""
  pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
  if not pickles:
    if names and all(n.endswith(".npy") for n in names):
      raise npz.CorruptCheckpointError(
          f"{source} is a NumPy .npz archive, not a PyTorch checkpoint; give it a .npz name")
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
      raise npz.CorruptCheckpointError(
          f"{source} is a TorchScript archive (torch.jit.save), not a state dict. "
          + torch_pickle.RESAVE_HINT)
    raise npz.CorruptCheckpointError(
        f"{source} is a zip archive without data.pkl, so not a torch.save checkpoint "
        f"(members: {sorted(names)[:5]})")
  if len(pickles) > 1:
    raise npz.CorruptCheckpointError(f"{source} holds several data.pkl: {pickles[:5]}")
  return pickles[0]


def _storage_loader(archive: zipfile.ZipFile, prefix: str,
                    source: str) -> Callable[[str, np.dtype, int], np.ndarray]:
  """``load_storage(key, dtype, numel)`` for the unpickler: storage ``key`` as a
  flat (numel,) array in native byte order, its size checked first."""
  names = archive.namelist()
  byteorder = "little"
  if prefix + "byteorder" in names:
    byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
      raise npz.CorruptCheckpointError(f"{source}: unknown byteorder {byteorder!r}")

  def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f"{prefix}data/{key}"
    if name not in names:
      raise npz.CorruptCheckpointError(f"{source}: storage record {name} is missing")
    dtype = dtype.newbyteorder("<" if byteorder == "little" else ">")
    expected = numel * dtype.itemsize
    if archive.getinfo(name).file_size < expected:
      raise npz.CorruptCheckpointError(
          f"{source}: storage {name} has {archive.getinfo(name).file_size} bytes, "
          f"needs {expected} (truncated or corrupt file)")
    buffer = bytearray(expected)
    with archive.open(name) as member:
      read = member.readinto(buffer)
    if read != expected:
      raise npz.CorruptCheckpointError(f"{source}: storage {name} is truncated")
    elements = np.frombuffer(buffer, dtype)
    return elements if dtype.isnative else elements.astype(dtype.newbyteorder("="))

  return load_storage


def read_torch_zip(f: BinaryIO, source: str) -> Any:
  """Unpickles a ``torch.save`` zip archive with the state-dict allowlist.

  Args:
    f: the seekable open file.
    source: how to name the file in errors.

  Returns:
    The saved object with tensors as NumPy arrays (a dict for state dicts and
    training checkpoints).

  Raises:
    ForbiddenGlobalError: the pickle needs a global outside the allowlist.
    CorruptCheckpointError: truncated or damaged archive, not a torch archive.
  """
  with _open_zip(f, source) as archive:
    data_pkl = _data_pkl(archive.namelist(), source)
    load_storage = _storage_loader(archive, data_pkl[:-len("data.pkl")], source)
    try:
      with archive.open(data_pkl) as member:
        unpickler = torch_pickle.StateDictUnpickler(
            io.BytesIO(member.read()), source=source, load_storage=load_storage)
        obj = unpickler.load()
    except npz.CheckpointError:
      raise
    except (zipfile.BadZipFile, zlib.error, OSError) as e:
      raise npz.CorruptCheckpointError(f"{source}: a zip member is damaged ({e})") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError, UnicodeDecodeError) as e:
      raise npz.CorruptCheckpointError(
          f"{source}: data.pkl is not a readable state-dict pickle ({type(e).__name__}: "
          f"{e}). If the file is complete, it stores objects other than tensors, dicts, "
          f"lists and numbers. {torch_pickle.RESAVE_HINT}") from e
  return torch_pickle.arrays_of(obj)
