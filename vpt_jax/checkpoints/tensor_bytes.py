"""Raw tensor bytes as NumPy arrays: what the PyTorch zip and safetensors readers share."""

from __future__ import annotations

import numpy as np

from vpt_jax.checkpoints import npz

__all__ = ["widen_bfloat16", "int_tuple"]


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
  """bfloat16 bit patterns (uint16, any shape) -> float32 of the same shape, exactly
  (bfloat16 is float32's top half)."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


def int_tuple(values, what: str) -> tuple[int, ...]:
  """``values`` as a tuple of ints (a tensor's size, stride or shape from the file).

  Raises:
    CorruptCheckpointError: not a tuple or list of (non-bool) ints.
  """
  if not isinstance(values, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise npz.CorruptCheckpointError(f"tensor {what} {values!r} is not a tuple of integers")
  return tuple(values)
