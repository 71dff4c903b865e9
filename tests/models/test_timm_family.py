"""timm_family: timm ViT names, a timm state dict in sharded safetensors loaded into
the ViT, and the loaded model against the NumPy reference ViT."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import hub_fixtures
import numpy_vit
import tolerances
import tower_fixtures as tw
from flavour_fixtures import D, HEADS, HEAD_DIM, IMAGE, official_state_dict
from vpt_jax.checkpoints import npz
from vpt_jax.methods import factory
from vpt_jax.models import backbones
from vpt_jax.models import timm_family
from vpt_jax.params.trees import flatten

VARIANT = "timm-vit-test4"  # width 16, 2 blocks, patch 4 (flavour_fixtures' sizes)


@pytest.mark.parametrize("variant, ours", [
    ("timm-vit-b16", "B/16"), ("timm-vit-s32", "S/32"), ("timm-vit-l16", "L/16"),
    ("timm-vit-test4", "test/4")])
def test_variant_names(variant, ours):
  assert timm_family.vit_variant(variant) == ours
  assert backbones.family_name(variant) == "timm"


def test_unknown_variant_suggests():
  with pytest.raises(ValueError, match=r"timm-vit-b16"):
    timm_family.vit_variant("timm-vit-x16")


def _timm_state(seed=0):
  return official_state_dict("moco", seed)  # timm's names, with a 10-class head


def _loaded(method, tmp_path, shapes_only=False):
  state = _timm_state()
  index = hub_fixtures.write_sharded(state, tmp_path / "timm", num_shards=3)
  model, params = tw.loaded_model(method, VARIANT, index, IMAGE, shapes_only=shapes_only)
  return state, model, params


def test_sharded_timm_file_loads_every_tensor(tmp_path):
  state, _, params = _loaded("linear", tmp_path, shapes_only=True)
  flat = flatten(params)
  np.testing.assert_array_equal(flat["cls"], state["cls_token"])
  np.testing.assert_array_equal(flat["Transformer/posembed_input/pos_embedding"],
                                state["pos_embed"])
  qkv = state["blocks.1.attn.qkv.weight"]
  value = flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_0/value/kernel"]
  for x, h, d in np.ndindex(D, HEADS, HEAD_DIM):  # timm's rows: q | k | v, head-major
    assert value[x, h, d] == qkv[2 * D + h * HEAD_DIM + d, x]
  np.testing.assert_array_equal(flat["Transformer/encoder_norm/scale"], state["norm.weight"])


def test_missing_and_misshapen_keys_are_named(tmp_path):
  state = _timm_state()
  del state["blocks.1.norm2.weight"]
  state["blocks.0.mlp.fc1.bias"] = state["blocks.0.mlp.fc1.bias"][:5]
  path = hub_fixtures.write_state_dict(state, tmp_path / "model.safetensors")
  with pytest.raises(npz.CheckpointMismatchError,
                     match=r"(?s)missing \(1\): blocks.1.norm2.weight.*blocks.0.mlp.fc1.bias"):
    factory.read_backbone_file(str(path), VARIANT)


@pytest.mark.numerics
def test_forward_matches_numpy_reference(tmp_path):
  _, model, params = _loaded("vpt_deep", tmp_path)
  images = np.random.default_rng(3).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)
  params = jax.tree.map(np.asarray, params)
  logits = model.apply({"params": params}, images)
  expected = numpy_vit.vit_forward(params, images)
  np.testing.assert_allclose(logits, expected, **tolerances.FORWARD_VS_NUMPY)
