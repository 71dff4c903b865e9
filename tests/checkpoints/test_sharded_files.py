"""Sharded checkpoints: an index JSON and its safetensors shards, read without torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hub_fixtures
import torch_fixtures
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import torch_files


def _arrays():
  return {"a.weight": torch_fixtures.rng_array((3, 2), seed=1),
          "b.bias": torch_fixtures.rng_array((4,), np.float16, seed=2),
          "c.weight": torch_fixtures.rng_array((2, 2, 2), seed=3),
          "step": np.array([7], np.int64)}


def test_sharded_index_reads_every_tensor_from_its_shard(tmp_path):
  arrays = _arrays()
  index = hub_fixtures.write_sharded(arrays, tmp_path, num_shards=3)
  loaded = torch_files.read_state_dict(str(index))
  assert list(loaded) == list(arrays)  # the index's order
  for key, value in arrays.items():
    np.testing.assert_array_equal(loaded[key], value)
    assert loaded[key].dtype == value.dtype
  # Each shard really holds only its share (the index is not decorative).
  weight_map = json.loads(index.read_text())["weight_map"]
  assert len(set(weight_map.values())) == 3
  one = torch_files.read_state_dict(str(tmp_path / weight_map["a.weight"]))
  assert "b.bias" not in one


def test_missing_shard_and_tensor_are_named(tmp_path):
  index = hub_fixtures.write_sharded(_arrays(), tmp_path, num_shards=2)
  weight_map = json.loads(index.read_text())["weight_map"]
  (tmp_path / weight_map["b.bias"]).unlink()
  with pytest.raises(npz.CheckpointNotFoundError, match=r"shard model-00002-of-00002"):
    torch_files.read_state_dict(str(index))
  index2 = hub_fixtures.write_sharded(_arrays(), tmp_path / "two", num_shards=2)
  doc = json.loads(index2.read_text())
  doc["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
  index2.write_text(json.dumps(doc))
  with pytest.raises(npz.CorruptCheckpointError, match=r"'ghost.weight'.*00001"):
    torch_files.read_state_dict(str(index2))


@pytest.mark.parametrize("content, match", [
    ("not json", "not a JSON shard index"),
    (json.dumps({"metadata": {}}), "no \"weight_map\""),
    (json.dumps({"weight_map": {"a": "../../etc/x.safetensors"}}), "outside its folder"),
])
def test_bad_index_is_refused(tmp_path, content, match):
  index = tmp_path / "model.safetensors.index.json"
  index.write_text(content)
  with pytest.raises(npz.CorruptCheckpointError, match=match):
    torch_files.read_state_dict(str(index))
