"""Reading PyTorch checkpoints as NumPy arrays, without torch and without running pickled code.

Two formats are understood, recognised by their bytes (not their names):

* the zip archive ``torch.save`` writes since torch 1.6 (``.pth``, ``.pth.tar``,
  ``.pt``, ``.bin``): ``<prefix>/data.pkl`` is a pickle whose tensors point, via
  persistent ids ``("storage", <storage class>, key, location, numel)``, at raw
  storages ``<prefix>/data/<key>``. The pickle is read by an unpickler that
  resolves only the few globals a state dict needs (``collections.OrderedDict``,
  ``torch._utils._rebuild_tensor_v2`` and the parameter variants, the
  ``torch.*Storage`` classes and dtype names) to local, side-effect-free
  stand-ins; any other global (``os.system``, ``builtins.eval``, numpy's array
  reconstruction, a model class, ...) refuses the whole file before anything is
  called. Tensors become arrays by (dtype, element offset, size, stride), with
  every index checked against the storage.
* ``.safetensors``: an 8-byte little-endian header length, a JSON header
  ``{name: {"dtype", "shape", "data_offsets"}}`` and the raw little-endian bytes.

The old (torch < 1.6) non-zip pickle format is refused: it can only be read by
unpickling, so re-save such files with a recent torch or as ``.safetensors``.

bfloat16 tensors are widened to float32 (exactly: bfloat16 is the top half of a
float32); every other dtype keeps its NumPy equivalent.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pickle
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from vpt_jax.checkpoints import npz

__all__ = ["ForbiddenGlobalError", "read_state_dict", "read_torch_zip", "read_safetensors",
           "unwrap_state_dict", "CONTAINER_KEYS"]

# Keys under which training scripts nest the model's state dict, tried in this
# order: MAE, Swin, ConvNeXt and DeiT save {"model": ...}; MoCo v3 and most
# torchvision-style training scripts {"state_dict": ...}.
CONTAINER_KEYS = ("model", "state_dict", "module", "params")
_PREFIX_TO_STRIP = "module."  # DistributedDataParallel's wrapper
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
# safetensors headers are JSON of a few hundred bytes per tensor; anything
# beyond this is not a safetensors file (or a hostile one).
_MAX_SAFETENSORS_HEADER = 100 << 20
_RESAVE_HINT = ("Re-save only the weights with a recent torch, e.g. "
                "`torch.save(model.state_dict(), 'weights.pth')`, or as safetensors "
                "(`safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')`).")


class ForbiddenGlobalError(npz.PickledCheckpointError):
  """The checkpoint's pickle names a global outside the state-dict allowlist.

  Attributes:
    global_name: "module.name" of the refused global.
  """

  def __init__(self, message: str, global_name: str):
    super().__init__(message)
    self.global_name = global_name


# ----------------------------------------------------------------------------
# Stand-ins for the globals a state dict pickle refers to. None of them runs
# anything but NumPy slicing on bytes already read from the archive.


class _StorageType:
  """What ``torch.FloatStorage`` (etc.) and dtype names resolve to: a dtype tag."""

  def __init__(self, name: str, dtype: np.dtype, bfloat16: bool = False):
    self.name = name
    self.dtype = np.dtype(dtype)  # bfloat16: its raw uint16 bits
    self.bfloat16 = bfloat16

  def __reduce__(self):  # never pickled back
    raise TypeError("storage types are not picklable")


class _Storage:
  """One storage's elements as a flat array (bfloat16 as raw uint16 bits)."""

  def __init__(self, elements: np.ndarray, bfloat16: bool):
    self.elements = elements
    self.bfloat16 = bfloat16


class _Tensor:
  """A rebuilt tensor; turned into its array after unpickling."""
  __slots__ = ("array",)

  def __init__(self, array: np.ndarray):
    self.array = array

  def __setstate__(self, state):
    # torch never BUILDs a tensor after _rebuild_tensor_v2; a file that does is
    # not a state dict this reader understands.
    raise npz.CorruptCheckpointError(
        "the pickle sets attributes on a tensor, which torch.save never writes")


_STORAGE_DTYPES = {
    "FloatStorage": ("float32", np.float32), "DoubleStorage": ("float64", np.float64),
    "HalfStorage": ("float16", np.float16), "BFloat16Storage": ("bfloat16", np.uint16),
    "LongStorage": ("int64", np.int64), "IntStorage": ("int32", np.int32),
    "ShortStorage": ("int16", np.int16), "CharStorage": ("int8", np.int8),
    "ByteStorage": ("uint8", np.uint8), "BoolStorage": ("bool", np.bool_),
    "ComplexFloatStorage": ("complex64", np.complex64),
    "ComplexDoubleStorage": ("complex128", np.complex128),
}
# torch dtype attributes (``torch.float32`` pickles as the global torch.float32).
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": np.uint16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
}


def _widen_bfloat16(bits: np.ndarray) -> np.ndarray:
  """bfloat16 bit patterns (uint16) -> float32, exactly (bfloat16 is float32's top half)."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


def _check_int_tuple(values, what: str) -> tuple[int, ...]:
  if not isinstance(values, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise npz.CorruptCheckpointError(f"tensor {what} {values!r} is not a tuple of integers")
  return tuple(values)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """``torch._utils._rebuild_tensor_v2``: a strided view of a storage, bounds-checked.

  Args:
    storage: a ``_Storage``.
    storage_offset: index of the first element (in elements, not bytes).
    size, stride: per-axis length and step (in elements).
    unused: requires_grad, backward hooks, metadata (irrelevant to values).
  """
  del unused
  if not isinstance(storage, _Storage):
    raise npz.CorruptCheckpointError("a tensor's storage is not a storage record")
  size = _check_int_tuple(size, "size")
  stride = _check_int_tuple(stride, "stride")
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise npz.CorruptCheckpointError(f"tensor size {size} / stride {stride} are invalid")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise npz.CorruptCheckpointError(f"tensor storage offset {storage_offset!r} is invalid")
  elements = storage.elements
  count = math.prod(size)
  contiguous = stride == tuple(math.prod(size[i + 1:]) for i in range(len(size)))
  if count == 0:
    array = np.zeros(size, elements.dtype)
  elif contiguous:
    if storage_offset + count > elements.size:
      raise npz.CorruptCheckpointError(
          f"a tensor of size {size} at offset {storage_offset} overruns its storage of "
          f"{elements.size} elements (truncated or corrupt file)")
    # Shares the storage's buffer, as torch's tensors do.
    array = elements[storage_offset:storage_offset + count].reshape(size)
  else:
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= elements.size:
      raise npz.CorruptCheckpointError(
          f"a tensor of size {size}, stride {stride} and offset {storage_offset} reaches "
          f"element {last} of a storage of {elements.size} (truncated or corrupt file)")
    # A strided tensor (e.g. a saved transpose) is compacted into its own buffer;
    # every index it reads was bounds-checked above.
    itemsize = elements.dtype.itemsize
    array = np.ascontiguousarray(np.lib.stride_tricks.as_strided(
        elements[storage_offset:], shape=size, strides=[s * itemsize for s in stride],
        writeable=False))
  return _Tensor(_widen_bfloat16(array) if storage.bfloat16 else array)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """``torch._utils._rebuild_parameter[_with_state]``: a Parameter is its data."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, _Tensor):
    raise npz.CorruptCheckpointError("a parameter does not wrap a tensor")
  return data


class _TensorClass:
  """``torch.Tensor`` / ``torch.nn.Parameter`` as ``_rebuild_from_type_v2`` names them."""


def _rebuild_from_type(func, new_type, args, state):
  """``torch._tensor._rebuild_from_type_v2``: rebuild, ignore the (subclass) type."""
  del state
  if func not in (_rebuild_tensor, _rebuild_parameter) or new_type is not _TensorClass:
    raise npz.CorruptCheckpointError("_rebuild_from_type_v2 with an unexpected function")
  return func(*args)


def _encode(text, encoding="latin1"):
  """``_codecs.encode``: how protocol-2 pickles spell bytes objects."""
  if not isinstance(text, str) or encoding != "latin1":
    raise npz.CorruptCheckpointError("unexpected _codecs.encode call in the pickle")
  return text.encode("latin1")


# (module, name) -> the local object the unpickler hands out. argparse.Namespace
# (training scripts save their arguments) is only ever created empty by
# object.__new__ and filled with plain data, so it runs no code either.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): _TensorClass,
    ("torch._tensor", "Tensor"): _TensorClass,
    ("torch.nn.parameter", "Parameter"): _TensorClass,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _encode,
    ("argparse", "Namespace"): argparse.Namespace,
    **{("torch", name): _StorageType(name, dtype, bfloat16=dtype_name == "bfloat16")
       for name, (dtype_name, dtype) in _STORAGE_DTYPES.items()},
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
    **{("torch", name): _StorageType(name, dtype, bfloat16=name == "bfloat16")
       for name, dtype in _TORCH_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickler whose globals come only from ``_ALLOWED_GLOBALS``."""

  def __init__(self, file: BinaryIO, *, source: str, load_storage):
    super().__init__(file, encoding="utf-8")
    self._source = source
    self._load_storage = load_storage
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str):
    allowed = _ALLOWED_GLOBALS.get((module, name))
    if allowed is None:
      raise ForbiddenGlobalError(
          f"{self._source} is refused: its pickle asks for the global {module}.{name}, and "
          "loading it would execute code from the file. Only plain state dicts (tensors in "
          f"dicts, lists and numbers) are read. {_RESAVE_HINT}", f"{module}.{name}")
    return allowed

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
        or not isinstance(pid[4], int) or pid[4] < 0):
      raise npz.CorruptCheckpointError(
          f"{self._source}: unexpected persistent id {pid!r:.200} in data.pkl")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      self._storages[key] = _Storage(self._load_storage(key, storage_type.dtype, numel),
                                     storage_type.bfloat16)
    storage = self._storages[key]
    if storage.elements.dtype != storage_type.dtype:
      raise npz.CorruptCheckpointError(
          f"{self._source}: storage {key} is used with two dtypes")
    return storage


def _arrays_of(obj):
  """Replaces every rebuilt ``_Tensor`` in nested dicts/lists/tuples by its array."""
  if isinstance(obj, _Tensor):
    return obj.array
  if isinstance(obj, Mapping):
    return {key: _arrays_of(value) for key, value in obj.items()}
  if isinstance(obj, list):
    return [_arrays_of(value) for value in obj]
  if isinstance(obj, tuple):
    return tuple(_arrays_of(value) for value in obj)
  return obj


# ----------------------------------------------------------------------------
# File access (local or gs://, through the .npz reader's helpers).


def _open(path: str) -> BinaryIO:
  """A seekable binary file for a local or gs:// path (the .npz reader's opener)."""
  try:
    return npz._open_for_reading(path)  # pylint: disable=protected-access
  except npz.CheckpointNotFoundError as e:
    # The .npz reader's message points at the ViT .npz files; say what is wanted here.
    raise npz.CheckpointNotFoundError(
        f"PyTorch checkpoint {path} does not exist or is a directory; pass the .pth, "
        ".pth.tar or .safetensors file itself") from e


def _describe_bytes(head: bytes) -> str:
  if head.startswith(b"\x93NUMPY"):
    return "it is a single .npy array"
  if head.startswith(b"\x89HDF"):
    return "it is an HDF5 file"
  if not head:
    return "it is empty"
  return "it is neither a torch zip archive nor a safetensors file"


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
  f.seek(0)
  if not zipfile.is_zipfile(f):
    raise npz.CorruptCheckpointError(
        f"{source} starts like a torch zip archive but its directory is missing "
        "(truncated download?); download it again")
  f.seek(0)
  try:
    archive = zipfile.ZipFile(f)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise npz.CorruptCheckpointError(f"{source}: the zip archive is damaged ({e})") from e
  with archive:
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pickles:
      if names and all(n.endswith(".npy") for n in names):
        raise npz.CorruptCheckpointError(
            f"{source} is a NumPy .npz archive, not a PyTorch checkpoint; give it a .npz name")
      if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise npz.CorruptCheckpointError(
            f"{source} is a TorchScript archive (torch.jit.save), not a state dict. "
            + _RESAVE_HINT)
      raise npz.CorruptCheckpointError(
          f"{source} is a zip archive without data.pkl, so not a torch.save checkpoint "
          f"(members: {sorted(names)[:5]})")
    if len(pickles) > 1:
      raise npz.CorruptCheckpointError(f"{source} holds several data.pkl: {pickles[:5]}")
    prefix = pickles[0][:-len("data.pkl")]
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

    try:
      with archive.open(pickles[0]) as member:
        unpickler = _StateDictUnpickler(io.BytesIO(member.read()), source=source,
                                        load_storage=load_storage)
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
          f"lists and numbers. {_RESAVE_HINT}") from e
  return _arrays_of(obj)


_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "BOOL": "?", "C64": "<c8",
}


def read_safetensors(f: BinaryIO, source: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a ``.safetensors`` file (BF16 widened to float32).

  Raises:
    CorruptCheckpointError: bad header, unknown dtype, offsets outside the file
      or a byte count that does not match the shape (truncated file).
  """
  f.seek(0, io.SEEK_END)
  file_size = f.tell()
  f.seek(0)
  head = f.read(8)
  if len(head) < 8:
    raise npz.CorruptCheckpointError(f"{source} is too short to be a safetensors file")
  header_size = int.from_bytes(head, "little")
  if header_size > min(_MAX_SAFETENSORS_HEADER, file_size - 8):
    raise npz.CorruptCheckpointError(
        f"{source}: safetensors header length {header_size} exceeds the file "
        f"({file_size} bytes; truncated or not a safetensors file)")
  try:
    header = json.loads(f.read(header_size).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise npz.CorruptCheckpointError(f"{source}: safetensors header is not JSON ({e})") from e
  if not isinstance(header, dict):
    raise npz.CorruptCheckpointError(f"{source}: safetensors header is not a JSON object")
  data_start = 8 + header_size
  data_size = file_size - data_start
  arrays = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
      raise npz.CorruptCheckpointError(
          f"{source}: safetensors entry {name!r} lacks dtype/shape/data_offsets") from e
    if dtype_name not in _SAFETENSORS_DTYPES:
      raise npz.CorruptCheckpointError(
          f"{source}: tensor {name!r} has dtype {dtype_name}, which is not supported "
          f"(supported: {', '.join(_SAFETENSORS_DTYPES)})")
    shape = _check_int_tuple(shape, f"{name!r} shape")
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
      raise npz.CorruptCheckpointError(f"{source}: tensor {name!r} has bad data_offsets")
    if end - begin != math.prod(shape) * dtype.itemsize or min(shape, default=0) < 0:
      raise npz.CorruptCheckpointError(
          f"{source}: tensor {name!r} of shape {list(shape)} ({dtype_name}) spans "
          f"{end - begin} bytes, needs {math.prod(shape) * dtype.itemsize}")
    if end > data_size:
      raise npz.CorruptCheckpointError(
          f"{source}: tensor {name!r} ends at byte {end} of a {data_size}-byte data "
          "section (truncated download?); download it again")
    buffer = bytearray(end - begin)
    f.seek(data_start + begin)
    if f.readinto(buffer) != len(buffer):
      raise npz.CorruptCheckpointError(f"{source}: tensor {name!r} is truncated")
    array = np.frombuffer(buffer, dtype).reshape(shape)
    if not dtype.isnative:  # a big-endian host: to native order before any widening
      array = array.astype(dtype.newbyteorder("="))
    arrays[name] = _widen_bfloat16(array) if dtype_name == "BF16" else array
  return arrays


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and any(isinstance(v, np.ndarray) for v in obj.values())


def unwrap_state_dict(obj: Any, source: str = "<checkpoint>") -> dict[str, np.ndarray]:
  """The flat {name: array} state dict inside a loaded checkpoint.

  The first of ``CONTAINER_KEYS`` that holds arrays is the state dict ("model"
  for MAE/Swin/ConvNeXt, "state_dict" for MoCo v3); without one, a mapping
  holding arrays is the state dict itself (torchvision files, safetensors).
  Non-array entries (epoch, optimizer, arguments) are ignored, and a
  ``module.`` prefix (DistributedDataParallel) shared by every key is removed.

  Raises:
    CheckpointError: no state dict found (the message lists the top-level keys).
  """
  state = None
  if isinstance(obj, Mapping):
    # Containers first: a training checkpoint's top level may hold a stray
    # tensor too (MoCo v3's "best_acc1").
    state = next((obj[key] for key in CONTAINER_KEYS if _is_state_dict(obj.get(key))), None)
  if state is None and _is_state_dict(obj):
    state = obj
  if state is None:
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise npz.CheckpointError(
        f"{source} holds no state dict: expected tensors at the top level or under one "
        f"of {list(CONTAINER_KEYS)}; found {found}")
  arrays = {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}
  if arrays and all(k.startswith(_PREFIX_TO_STRIP) for k in arrays):
    arrays = {k[len(_PREFIX_TO_STRIP):]: v for k, v in arrays.items()}
  return arrays


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch checkpoint (zip ``torch.save`` or safetensors) as arrays.

  Args:
    path: local or gs:// path of a ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.bin``
      (torch >= 1.6 zip format) or ``.safetensors`` file. The format is
      recognised by content.

  Returns:
    {name: array} with the state dict's names (nested "model"/"state_dict"
    containers unwrapped, a shared ``module.`` prefix removed, non-tensor
    entries dropped). float16 stays float16; bfloat16 becomes float32.

  Raises:
    CheckpointNotFoundError: no such file.
    ForbiddenGlobalError: the pickle would execute code (file refused).
    PickledCheckpointError: a legacy (non-zip) torch pickle.
    CorruptCheckpointError: truncated, damaged, or not a PyTorch checkpoint.
    CheckpointError: no state dict inside.
  """
  path = os.fspath(path)
  with _open(path) as f:
    head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
      obj = read_torch_zip(f, path)
    elif head.startswith(_PICKLE_PROTO):
      raise npz.PickledCheckpointError(
          f"{path} is a legacy (torch < 1.6, non-zip) pickle checkpoint; reading it would "
          f"mean unpickling arbitrary code, so it is refused. {_RESAVE_HINT}")
    elif len(head) > 8 and head[8:9] == b"{":
      obj = read_safetensors(f, path)
    else:
      raise npz.CorruptCheckpointError(
          f"{path} is not a PyTorch checkpoint: {_describe_bytes(head)}. Expected a "
          "torch.save zip archive (.pth, .pth.tar) or a .safetensors file.")
  return unwrap_state_dict(obj, path)
