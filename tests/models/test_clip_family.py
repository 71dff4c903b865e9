"""clip_family: variants, open_clip's state dict (visual.* beside the text tower)
loaded key for key, and ln_pre / QuickGELU / ln_post(CLS) @ proj against an
independent NumPy forward of openai/CLIP's VisionTransformer."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import hub_fixtures
import numpy_towers
import tower_fixtures as tw
from vpt_jax.checkpoints import npz
from vpt_jax.models import clip_family
from vpt_jax.params.trees import flatten


def test_variants():
  size, options = clip_family.decode("clip-B/16")
  assert size == "B/16" and options.ffn == "quick_gelu" and options.projection == 512
  assert options.ln_pre and not options.patch_bias and options.layer_norm_epsilon == 1e-5
  assert clip_family.decode("clip-L/14-gelu")[1].ffn == "gelu"
  assert clip_family.decode("clip-L/14")[1].projection == 768
  with pytest.raises(ValueError, match=r"clip-<B\|L\|H>/<patch>"):
    clip_family.decode("clip-X/16")
  with pytest.raises(ValueError, match=r"CLIP has no S tower"):
    clip_family.decode("clip-S/16")


def test_open_clip_file_loads_the_image_tower(tmp_path):
  state = tw.clip_state()
  path = hub_fixtures.write_state_dict(state, tmp_path / "open_clip_model.safetensors")
  _, params = tw.loaded_model("linear", "clip-test/4", path, 16, shapes_only=True)
  flat = flatten(params)
  np.testing.assert_array_equal(flat["projection/kernel"], state["visual.proj"])  # x @ proj
  np.testing.assert_array_equal(flat["cls"], state["visual.class_embedding"][None, None])
  np.testing.assert_array_equal(flat["Transformer/posembed_input/pos_embedding"],
                                state["visual.positional_embedding"][None])
  np.testing.assert_array_equal(flat["Transformer/ln_pre/scale"], state["visual.ln_pre.weight"])
  assert "embedding/bias" not in flat  # conv1 has no bias
  in_proj = state["visual.transformer.resblocks.0.attn.in_proj_weight"]
  key = flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/kernel"]
  for x, h, d in np.ndindex(key.shape):
    assert key[x, h, d] == in_proj[tw.D + h * 8 + d, x]


def test_missing_and_misshapen_keys_are_named():
  state = tw.clip_state()
  del state["visual.ln_pre.bias"]
  state["visual.proj"] = state["visual.proj"][:, :4]
  with pytest.raises(npz.CheckpointMismatchError,
                     match=r"(?s)missing \(1\): visual.ln_pre.bias.*visual.proj: file "
                           r"\(16, 4\) vs expected \(16, 8\)"):
    clip_family.convert_torch(state, "clip-test/4")


@pytest.mark.numerics
def test_forward_matches_numpy_clip(tmp_path):
  """QuickGELU with VPT prompts after CLS (the exact-GELU MLP is the plain ViT's)."""
  state = tw.clip_state()
  tw.write_torch(state, tmp_path / "open_clip_pytorch_model.bin")
  model, params = tw.loaded_model("vpt_shallow", "clip-test/4",
                                  tmp_path / "open_clip_pytorch_model.bin", 16)
  params = jax.tree.map(np.asarray, params)
  x = tw.images(16)
  features = numpy_towers.clip_features(state, x, heads=tw.HEADS,
                                        prompts=params["vpt"]["shallow"], quick=True)
  assert features.shape == (2, 8)  # the joint embedding's width
  tw.assert_forward_matches(model, params, x, features)
