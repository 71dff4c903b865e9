"""Reading ``.safetensors`` files as NumPy arrays (no safetensors package needed).

The format: an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets"}}`` (plus an optional
``__metadata__`` entry) and the raw little-endian bytes. Every offset, shape
and byte count is checked against the file before it is used; BF16 tensors are
widened to float32 (exactly), every other dtype keeps its NumPy equivalent.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, BinaryIO

import numpy as np

from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints.tensor_bytes import int_tuple, widen_bfloat16

__all__ = ["read_safetensors"]

# safetensors headers are JSON of a few hundred bytes per tensor; anything
# beyond this is not a safetensors file (or a hostile one).
_MAX_SAFETENSORS_HEADER = 100 << 20
_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "BOOL": "?", "C64": "<c8",
}


def _read_header(f: BinaryIO, source: str) -> tuple[dict[str, Any], int, int]:
  """(the JSON header, where the data section starts, its size in bytes)."""
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
  return header, data_start, file_size - data_start


def _read_tensor(f: BinaryIO, name: str, entry: Any, data_start: int, data_size: int,
                 source: str) -> np.ndarray:
  """One header entry's tensor, its dtype, shape and offsets checked first."""
  try:
    dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
  except (TypeError, KeyError, ValueError) as e:
    raise npz.CorruptCheckpointError(
        f"{source}: safetensors entry {name!r} lacks dtype/shape/data_offsets") from e
  if dtype_name not in _SAFETENSORS_DTYPES:
    raise npz.CorruptCheckpointError(
        f"{source}: tensor {name!r} has dtype {dtype_name}, which is not supported "
        f"(supported: {', '.join(_SAFETENSORS_DTYPES)})")
  shape = int_tuple(shape, f"{name!r} shape")
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
  return widen_bfloat16(array) if dtype_name == "BF16" else array


def read_safetensors(f: BinaryIO, source: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a ``.safetensors`` file (BF16 widened to float32).

  Args:
    f: the seekable open file.
    source: how to name the file in errors.

  Returns:
    {name: array of the header's shape}, in the header's order.

  Raises:
    CorruptCheckpointError: bad header, unknown dtype, offsets outside the file
      or a byte count that does not match the shape (truncated file).
  """
  header, data_start, data_size = _read_header(f, source)
  return {name: _read_tensor(f, name, entry, data_start, data_size, source)
          for name, entry in header.items() if name != "__metadata__"}
