"""Checkpoint files as the hub serves them: safetensors from NumPy state dicts,
sharded checkpoints with an index JSON, and a hub cache directory.

The cache layout is huggingface_hub's (``HF_HUB_CACHE``):
``models--<org>--<name>/blobs/<sha>``, ``snapshots/<commit>/<file>`` (symlinks
into ``blobs``) and ``refs/<revision>`` holding the commit hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

import torch_fixtures

_DTYPE_TAGS = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
               np.dtype(np.int64): "I64"}


def safetensors_bytes_entries(arrays: dict[str, np.ndarray]) -> list:
  """(name, dtype tag, shape, little-endian bytes) for ``write_safetensors``."""
  entries = []
  for name, value in arrays.items():
    value = np.ascontiguousarray(value)
    entries.append((name, _DTYPE_TAGS[value.dtype], value.shape,
                    value.astype(value.dtype.newbyteorder("<")).tobytes()))
  return entries


def write_state_dict(arrays: dict[str, np.ndarray], path) -> pathlib.Path:
  """A single ``.safetensors`` file holding ``arrays`` (float32/float16/int64)."""
  torch_fixtures.write_safetensors(safetensors_bytes_entries(arrays), path,
                                   metadata={"format": "pt"})
  return pathlib.Path(path)


def write_sharded(arrays: dict[str, np.ndarray], folder, num_shards: int = 2,
                  stem: str = "model") -> pathlib.Path:
  """``<stem>-0000i-of-0000n.safetensors`` shards and ``<stem>.safetensors.index.json``
  (tensors dealt round-robin, so every shard holds some); returns the index path."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  names = [f"{stem}-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
  weight_map = {key: names[i % num_shards] for i, key in enumerate(arrays)}
  for name in names:
    write_state_dict({k: v for k, v in arrays.items() if weight_map[k] == name}, folder / name)
  total = sum(np.asarray(v).nbytes for v in arrays.values())
  index = folder / f"{stem}.safetensors.index.json"
  index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
  return index


def hub_cache(cache_dir, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40,
              revision: str = "main") -> pathlib.Path:
  """Lays ``files`` ({path in repo: bytes}) out as the hub's cache; returns the snapshot."""
  repo = pathlib.Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
  snapshot = repo / "snapshots" / commit
  (repo / "blobs").mkdir(parents=True, exist_ok=True)
  for name, data in files.items():
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    target = snapshot / name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, target.parent), target)
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / revision).write_text(commit)
  return snapshot
