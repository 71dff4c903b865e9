"""PyTorch checkpoint files written by hand, without torch.

``write_torch_zip`` reproduces what ``torch.save`` (torch >= 1.6) writes: a zip
with ``<archive>/data.pkl`` (pickle protocol 2), the raw storages
``<archive>/data/<key>``, ``<archive>/version`` and ``<archive>/byteorder``.
Inside data.pkl every tensor is the call
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
OrderedDict())`` and every storage the persistent id
``("storage", torch.<Type>Storage, key, location, numel)``, as torch's
``_save`` emits them. The globals are written as GLOBAL opcodes by name, so
torch need not be installed.

``write_safetensors`` writes the safetensors layout (8-byte little-endian header
length, JSON header, raw bytes) from raw byte strings the test spells out.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile

import numpy as np

# numpy dtype -> the storage class name torch pickles for it.
STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class GlobalRef:
  """A module-level name written into the pickle as a GLOBAL opcode."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name
    self.__name__ = name  # save_reduce reads it (and must not see "__newobj__")

  def __call__(self, *args):
    raise AssertionError("only pickled, never called")


class Storage:
  """A torch storage: flat elements (written as data/<key>) of one dtype.

  ``bfloat16_bits``: the elements are uint16 bfloat16 bit patterns, pickled as
  ``torch.BFloat16Storage``.
  """

  def __init__(self, elements: np.ndarray, key: str, bfloat16_bits: bool = False):
    self.elements = np.ascontiguousarray(elements).reshape(-1)
    self.key = key
    self.type_name = "BFloat16Storage" if bfloat16_bits else STORAGE_NAMES[self.elements.dtype]


class Tensor:
  """A strided view of a Storage: pickled like torch.Tensor.__reduce_ex__."""

  def __init__(self, storage: Storage, size, stride=None, offset: int = 0):
    size = tuple(size)
    if stride is None:
      stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    self.storage, self.size, self.stride, self.offset = storage, size, tuple(stride), offset

  def __reduce__(self):
    return (GlobalRef("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, self.size, self.stride, False,
             collections.OrderedDict()))


class Reduce:
  """Any call ``module.name(*args)`` written as GLOBAL + REDUCE (e.g. os.system)."""

  def __init__(self, module: str, name: str, args: tuple):
    self.ref, self.args = GlobalRef(module, name), args

  def __reduce__(self):
    return (self.ref, self.args)


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pure-Python pickler (protocol 2) that writes GlobalRefs and torch storage ids."""
  dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages: dict[str, Storage] = {}

  def save_global_ref(self, obj: GlobalRef, name=None):
    del name
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
    self.memoize(obj)

  dispatch[GlobalRef] = save_global_ref

  def persistent_id(self, obj):
    if isinstance(obj, Storage):
      self.storages[obj.key] = obj
      return ("storage", GlobalRef("torch", obj.type_name), obj.key, "cpu",
              obj.elements.size)
    return None


def pickle_bytes(obj) -> tuple[bytes, dict[str, Storage]]:
  """data.pkl bytes for ``obj`` and the storages it references."""
  buffer = io.BytesIO()
  pickler = _TorchPickler(buffer)
  pickler.dump(obj)
  return buffer.getvalue(), pickler.storages


def write_torch_zip(obj, path, archive: str = "archive", data_pkl: bytes | None = None) -> None:
  """Writes ``obj`` (dicts/lists/numbers with ``Tensor``s) as torch.save does.

  ``data_pkl`` replaces the pickle bytes (for hostile files).
  """
  pickled, storages = pickle_bytes(obj)
  if data_pkl is not None:
    pickled = data_pkl
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
    z.writestr(f"{archive}/data.pkl", pickled)
    z.writestr(f"{archive}/byteorder", "little")
    for key, storage in storages.items():
      z.writestr(f"{archive}/data/{key}", storage.elements.astype(
          storage.elements.dtype.newbyteorder("<")).tobytes())
    z.writestr(f"{archive}/version", "3\n")


def tensor_of(array: np.ndarray, key: str) -> Tensor:
  """A contiguous Tensor holding ``array`` in a storage of its own."""
  array = np.asarray(array)
  return Tensor(Storage(array, key), array.shape)


def write_safetensors(entries: list[tuple[str, str, tuple, bytes]], path,
                      metadata: dict | None = None) -> None:
  """entries: (name, dtype tag, shape, raw little-endian bytes), in file order."""
  header, offset, data = {}, 0, b""
  for name, dtype, shape, raw in entries:
    header[name] = {"dtype": dtype, "shape": list(shape),
                    "data_offsets": [offset, offset + len(raw)]}
    offset += len(raw)
    data += raw
  if metadata is not None:
    header["__metadata__"] = metadata
  blob = json.dumps(header).encode("utf-8")
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)


def rng_array(shape, dtype=np.float32, seed=0) -> np.ndarray:
  """Standard-normal values of ``shape`` in ``dtype``, reproducible by ``seed``."""
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
