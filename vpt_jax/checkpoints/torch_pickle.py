"""The pickle inside a ``torch.save`` archive, read without running code from the file.

``data.pkl`` is a pickle whose tensors point, via persistent ids
``("storage", <storage class>, key, location, numel)``, at raw storages that
the caller loads (``torch_zip``). The unpickler here resolves only the few
globals a state dict needs (``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and the parameter variants, the
``torch.*Storage`` classes and dtype names) to local, side-effect-free
stand-ins; any other global (``os.system``, ``builtins.eval``, numpy's array
reconstruction, a model class, ...) refuses the whole file before anything is
called. Tensors become arrays by (dtype, element offset, size, stride), with
every index checked against the storage; bfloat16 storages are widened to
float32.
"""

from __future__ import annotations

import argparse
import collections
import math
import pickle
from collections.abc import Mapping
from typing import Any, BinaryIO, Callable

import numpy as np

from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints.tensor_bytes import int_tuple, widen_bfloat16

__all__ = ["ForbiddenGlobalError", "StateDictUnpickler", "arrays_of", "RESAVE_HINT"]

RESAVE_HINT = ("Re-save only the weights with a recent torch, e.g. "
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
  size = int_tuple(size, "size")
  stride = int_tuple(stride, "stride")
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
  return _Tensor(widen_bfloat16(array) if storage.bfloat16 else array)


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


class StateDictUnpickler(pickle.Unpickler):
  """Unpickler whose globals come only from ``_ALLOWED_GLOBALS``.

  ``load()`` returns the pickled object with tensors as ``_Tensor`` records
  (``arrays_of`` turns them into arrays). ``load_storage(key, dtype, numel)``
  returns storage ``key``'s flat (numel,) array of ``dtype`` (native byte
  order); it is called once per storage, when a tensor first refers to it.
  """

  def __init__(self, file: BinaryIO, *, source: str,
               load_storage: Callable[[str, np.dtype, int], np.ndarray]):
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
          f"dicts, lists and numbers) are read. {RESAVE_HINT}", f"{module}.{name}")
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


def arrays_of(obj):
  """Replaces every rebuilt ``_Tensor`` in nested dicts/lists/tuples by its array."""
  if isinstance(obj, _Tensor):
    return obj.array
  if isinstance(obj, Mapping):
    return {key: arrays_of(value) for key, value in obj.items()}
  if isinstance(obj, list):
    return [arrays_of(value) for value in obj]
  if isinstance(obj, tuple):
    return tuple(arrays_of(value) for value in obj)
  return obj
