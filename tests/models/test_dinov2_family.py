"""dinov2_family: variants, the official state dict loaded key for key, and the
tower (LayerScale, registers, interpolated position embedding, SwiGLU) against
an independent NumPy forward of the official DINOv2."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import numpy_towers
import tower_fixtures as tw
from vpt_jax import errors
from vpt_jax.checkpoints import npz
from vpt_jax.methods import factory
from vpt_jax.models import dinov2_family
from vpt_jax.params.trees import flatten


def test_named_variants_decode_as_the_hub_builds_them():
  size, options = dinov2_family.decode("dinov2-B/14")
  assert size == "B/14" and options.posemb_grid == 37 and options.registers == 0
  assert (options.interpolate_offset, options.interpolate_antialias) == (0.1, False)
  assert options.layer_scale and options.ffn == "gelu"
  _, reg = dinov2_family.decode("dinov2-g/14-reg")
  assert reg.registers == 4 and reg.ffn == "swiglu" and reg.prefix_tokens == 5
  assert (reg.interpolate_offset, reg.interpolate_antialias) == (0.0, True)
  with pytest.raises(ValueError, match="dinov2-B/14"):
    dinov2_family.decode("dinov2-B14")


def test_official_file_loads_every_tensor(tmp_path):
  state = tw.dinov2_state(registers=True, swiglu=True)
  tw.write_torch(state, tmp_path / "dinov2_vitg14_reg4_pretrain.pth")
  _, params = tw.loaded_model("linear", "dinov2-testg/4-reg",
                              tmp_path / "dinov2_vitg14_reg4_pretrain.pth", 16,
                              shapes_only=True)
  flat = flatten(params)
  np.testing.assert_array_equal(flat["Transformer/registers"], state["register_tokens"])
  np.testing.assert_array_equal(flat["Transformer/posembed_input/pos_embedding"],
                                state["pos_embed"])  # stored at 5 x 5, not resampled
  block = "Transformer/encoderblock_1/"
  np.testing.assert_array_equal(flat[block + "ls1/gamma"], state["blocks.1.ls1.gamma"])
  np.testing.assert_array_equal(flat[block + "ls2/gamma"], state["blocks.1.ls2.gamma"])
  np.testing.assert_array_equal(flat[block + "MlpBlock_0/w12/kernel"],
                                state["blocks.1.mlp.w12.weight"].T)
  np.testing.assert_array_equal(flat[block + "MlpBlock_0/w3/bias"], state["blocks.1.mlp.w3.bias"])
  assert not any("mask_token" in key for key in flat)


def test_missing_and_misshapen_keys_are_named(tmp_path):
  state = tw.dinov2_state(registers=True, swiglu=False)
  del state["blocks.0.ls2.gamma"]
  state["register_tokens"] = state["register_tokens"][:, :2]
  with pytest.raises(npz.CheckpointMismatchError,
                     match=r"(?s)missing \(1\): blocks.0.ls2.gamma.*register_tokens: file "
                           r"\(1, 2, 16\) vs expected \(1, 4, 16\).*dinov2-B/14-reg"):
    dinov2_family.convert_torch(state, "dinov2-test/4-reg")
  with pytest.raises(npz.CheckpointMismatchError, match=r"unexpected \(1\): register_tokens"):
    dinov2_family.convert_torch(tw.dinov2_state(registers=True, swiglu=False), "dinov2-test/4")


def test_ablation_pools_are_refused():
  spec = tw.tower_spec("vpt_shallow", "dinov2-test/4-reg", 16, pool="img_pool")
  with pytest.raises(errors.UserError, match="prompt.pool=original"):
    factory.validate_spec(spec)


@pytest.mark.numerics
@pytest.mark.parametrize("variant, registers, swiglu, image, method", [
    ("dinov2-test/4-reg", True, False, 16, "vpt_shallow"),  # antialias, 5x5 -> 4x4
    ("dinov2-testg/4", False, True, 24, "vpt_shallow"),  # offset 0.1, 5x5 -> 6x6, SwiGLU
])
def test_forward_matches_numpy_dinov2(tmp_path, variant, registers, swiglu, image, method):
  state = tw.dinov2_state(registers=registers, swiglu=swiglu)
  tw.write_torch(state, tmp_path / "dinov2.pth")
  model, params = tw.loaded_model(method, variant, tmp_path / "dinov2.pth", image)
  params = jax.tree.map(np.asarray, params)
  x = tw.images(image)
  _, options = dinov2_family.decode(variant)
  features = numpy_towers.dinov2_features(
      state, x, heads=tw.HEADS, offset=options.interpolate_offset,
      antialias=options.interpolate_antialias, prompts=np.asarray(params["vpt"]["shallow"]))
  tw.assert_forward_matches(model, params, x, features)
