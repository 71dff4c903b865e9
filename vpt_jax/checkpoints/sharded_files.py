"""Sharded checkpoints: an index JSON whose ``weight_map`` names each tensor's shard.

The layout of ``transformers``/``huggingface_hub`` (``model.safetensors.index.json``
or ``pytorch_model.bin.index.json``): ``{"metadata": {...}, "weight_map":
{tensor name: shard file name}}`` with the shards beside the index. Every shard
is read with the single-file reader (safetensors without torch), and the
index is checked against the shards: a tensor the index names but its shard
lacks, or a shard name that leaves the index's folder, refuses the file.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from vpt_jax.checkpoints import npz

__all__ = ["INDEX_SUFFIX", "is_index", "read_sharded"]

INDEX_SUFFIX = ".index.json"


def is_index(path: str) -> bool:
  """Whether ``path`` names a shard index (``*.index.json``)."""
  return str(path).endswith(INDEX_SUFFIX)


def _weight_map(index_path: str) -> dict[str, str]:
  """The index's {tensor: shard}, its types and shard names checked."""
  try:
    with npz.open_for_reading(index_path) as f:
      index = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise npz.CorruptCheckpointError(f"{index_path} is not a JSON shard index ({e})") from e
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise npz.CorruptCheckpointError(
        f"{index_path} has no \"weight_map\" of tensor name -> shard file; pass a "
        "model.safetensors.index.json written by transformers or huggingface_hub")
  for shard in set(weight_map.values()):
    if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
      raise npz.CorruptCheckpointError(
          f"{index_path} names shard {shard!r} outside its folder; refusing the index")
  return weight_map


def read_sharded(index_path: str,
                 read_file: Callable[[str], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Every tensor of a sharded checkpoint, in the index's order.

  Args:
    index_path: the ``*.index.json`` (local or gs://); the shards are beside it.
    read_file: reads one shard file into {name: array} (e.g. the safetensors
      or torch reader of ``torch_files``).

  Raises:
    CheckpointNotFoundError: the index or a shard is missing (named).
    CorruptCheckpointError: not an index, or a tensor the index names is not
      in its shard (named, with the shard).
  """
  weight_map = _weight_map(index_path)
  folder = os.path.dirname(index_path)
  shards: dict[str, dict[str, np.ndarray]] = {}
  for shard in dict.fromkeys(weight_map.values()):
    shard_path = os.path.join(folder, shard)
    try:
      shards[shard] = read_file(shard_path)
    except npz.CheckpointNotFoundError as e:
      raise npz.CheckpointNotFoundError(
          f"shard {shard} of {index_path} is missing (looked for {shard_path}); download "
          "every shard the index names into its folder") from e
  out = {}
  for name, shard in weight_map.items():
    if name not in shards[shard]:
      raise npz.CorruptCheckpointError(
          f"{index_path} puts tensor {name!r} in {shard}, which does not hold it "
          "(a partial or mixed download?)")
    out[name] = shards[shard][name]
  return out
