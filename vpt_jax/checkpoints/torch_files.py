"""Reading PyTorch checkpoints as NumPy arrays, without torch and without running pickled code.

Two formats are understood, recognised by their bytes (not their names):

* the zip archive ``torch.save`` writes since torch 1.6 (``.pth``, ``.pth.tar``,
  ``.pt``, ``.bin``), read by ``torch_zip`` with ``torch_pickle``'s allowlisted
  unpickler: any global a plain state dict does not need (``os.system``,
  ``builtins.eval``, numpy's array reconstruction, a model class, ...) refuses
  the whole file before anything is called;
* ``.safetensors``, read by ``safetensors_files``.

The old (torch < 1.6) non-zip pickle format is refused: it can only be read by
unpickling, so re-save such files with a recent torch or as ``.safetensors``.

Training checkpoints are unwrapped to their state dict (``unwrap_state_dict``).
bfloat16 tensors are widened to float32 (exactly: bfloat16 is the top half of a
float32); every other dtype keeps its NumPy equivalent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import sharded_files
from vpt_jax.checkpoints import torch_pickle
from vpt_jax.checkpoints.safetensors_files import read_safetensors
from vpt_jax.checkpoints.torch_zip import read_torch_zip

__all__ = ["read_state_dict", "unwrap_state_dict", "CONTAINER_KEYS"]

# Keys under which training scripts nest the model's state dict, tried in this
# order: MAE, Swin, ConvNeXt and DeiT save {"model": ...}; MoCo v3 and most
# torchvision-style training scripts {"state_dict": ...}.
CONTAINER_KEYS = ("model", "state_dict", "module", "params")
_PREFIX_TO_STRIP = "module."  # DistributedDataParallel's wrapper
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


# ----------------------------------------------------------------------------
# File access (local or gs://, through the .npz reader's helpers).


def _open(path: str) -> BinaryIO:
  """A seekable binary file for a local or gs:// path (the .npz reader's opener)."""
  try:
    return npz.open_for_reading(path)
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
      (torch >= 1.6 zip format) or ``.safetensors`` file (the format is
      recognised by content), or a shard index ``*.index.json`` (see
      ``sharded_files``) whose shards are such files.

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
  if sharded_files.is_index(path):
    return sharded_files.read_sharded(path, read_state_dict)
  with _open(path) as f:
    head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
      obj = read_torch_zip(f, path)
    elif head.startswith(_PICKLE_PROTO):
      raise npz.PickledCheckpointError(
          f"{path} is a legacy (torch < 1.6, non-zip) pickle checkpoint; reading it would "
          f"mean unpickling arbitrary code, so it is refused. {torch_pickle.RESAVE_HINT}")
    elif len(head) > 8 and head[8:9] == b"{":
      obj = read_safetensors(f, path)
    else:
      raise npz.CorruptCheckpointError(
          f"{path} is not a PyTorch checkpoint: {_describe_bytes(head)}. Expected a "
          "torch.save zip archive (.pth, .pth.tar) or a .safetensors file.")
  return unwrap_state_dict(obj, path)
