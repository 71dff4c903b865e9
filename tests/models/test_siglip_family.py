"""siglip_family: big_vision's .npz and transformers' safetensors of the same tower
load to the same parameters; no CLS, prompts before the patches, and the MAP head
against an independent NumPy forward of transformers' SiglipVisionTransformer."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import hub_fixtures
import numpy_towers
import tower_fixtures as tw
from vpt_jax.checkpoints import npz
from vpt_jax.models import siglip_family
from vpt_jax.params.trees import flatten


def test_variants():
  size, options = siglip_family.decode("siglip-So400m/14")
  assert size == "So400m/14" and not options.class_token and options.pooling == "map"
  assert options.ffn == "gelu_tanh" and options.prefix_tokens == 0
  assert options.map_attends_prompts  # the default
  assert not siglip_family.decode("siglip-B/16-patchmap")[1].map_attends_prompts
  with pytest.raises(ValueError, match=r"siglip-<B\|L\|So400m>/<patch>"):
    siglip_family.decode("siglip-B16")


def _files(tmp_path):
  arrays = tw.siglip_big_vision()
  np.savez(tmp_path / "webli_en_b16_224_63724782.npz", **arrays)
  state = tw.siglip_hf_from_big_vision(arrays)
  hub_fixtures.write_sharded(state, tmp_path / "hf", num_shards=2)
  return arrays, state


def test_big_vision_npz_and_hf_safetensors_load_the_same_tower(tmp_path):
  arrays, _ = _files(tmp_path)
  _, from_npz = tw.loaded_model("linear", "siglip-test/4",
                                tmp_path / "webli_en_b16_224_63724782.npz", 16,
                                shapes_only=True)
  _, from_hf = tw.loaded_model("linear", "siglip-test/4",
                               tmp_path / "hf" / "model.safetensors.index.json", 16,
                               shapes_only=True)
  npz_flat, hf_flat = flatten(from_npz), flatten(from_hf)
  assert "cls" not in npz_flat
  for key, value in arrays.items():
    if key.startswith("params/img/"):
      ours = key[len("params/img/"):]
      ours = "Transformer/posembed_input/pos_embedding" if ours == "pos_embedding" else ours
      np.testing.assert_array_equal(npz_flat[ours], value)
  for key, value in npz_flat.items():
    if not key.startswith("head/"):
      np.testing.assert_allclose(hf_flat[key], value, rtol=0, atol=0, err_msg=key)


def test_missing_keys_are_named(tmp_path):
  arrays = tw.siglip_big_vision()
  state = tw.siglip_hf_from_big_vision(arrays)
  del state["vision_model.head.probe"]
  with pytest.raises(npz.CheckpointMismatchError, match=r"missing \(1\): vision_model.head.probe"):
    siglip_family.convert_torch(state, "siglip-test/4")
  del arrays["params/img/MAPHead_0/LayerNorm_0/scale"]
  np.savez(tmp_path / "cut.npz", **arrays)
  with pytest.raises(npz.CheckpointMismatchError, match=r"MAPHead_0/LayerNorm_0/scale"):
    tw.loaded_model("linear", "siglip-test/4", tmp_path / "cut.npz", 16, shapes_only=True)


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ["siglip-test/4", "siglip-test/4-patchmap"])
def test_forward_matches_numpy_siglip(tmp_path, variant):
  _, state = _files(tmp_path)
  model, params = tw.loaded_model("vpt_shallow", variant,
                                  tmp_path / "hf" / "model.safetensors.index.json", 16)
  params = jax.tree.map(np.asarray, params)
  x = tw.images(16)
  features = numpy_towers.siglip_features(
      state, x, heads=tw.HEADS, prompts=params["vpt"]["shallow"],
      map_reads_prompts=not variant.endswith("patchmap"))
  tw.assert_forward_matches(model, params, x, features)


def test_bare_vision_tower_keys_convert_the_same():
  """transformers 5 saves a SiglipVisionModel without the "vision_model." prefix."""
  state = tw.siglip_hf_from_big_vision(tw.siglip_big_vision())
  bare = {key[len("vision_model."):]: value for key, value in state.items()
          if key.startswith("vision_model.")}
  full, stripped = (siglip_family.convert_torch(s, "siglip-test/4") for s in (state, bare))
  assert full.keys() == stripped.keys()
  for key in full:
    np.testing.assert_array_equal(full[key], stripped[key])
