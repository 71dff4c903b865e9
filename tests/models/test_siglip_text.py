"""models/siglip_text: transformers' SigLIP text tower (text_model.*) mapped to
clip_text's names and run with SigLIP's options, against an independent NumPy
forward on the original names."""

from __future__ import annotations

import numpy as np
import pytest

import clip_text_fixtures as fx
import tolerances
from vpt_jax import errors
from vpt_jax.models import clip_text
from vpt_jax.models import siglip_text


@pytest.mark.numerics
def test_siglip_text_tower_matches_numpy():
  sd = fx.siglip_state_dict()
  tokens = np.random.default_rng(0).integers(1, len(fx.VOCAB), (3, fx.CONTEXT))
  tokens[:, 6:] = fx.END_ID  # padded to the full length, as SigLIP's processor does
  arrays = siglip_text.to_clip_names(sd, "tiny")
  got = clip_text.encode_text({k: v for k, v in arrays.items() if k not in clip_text.SCALARS},
                              tokens, num_heads=fx.HEADS, **siglip_text.OPTIONS)
  np.testing.assert_allclose(np.asarray(got), fx.numpy_siglip_text(sd, tokens),
                             **tolerances.FORWARD_VS_NUMPY)


def test_the_scalars_are_read_and_the_layout_detected():
  sd = fx.siglip_state_dict()
  assert siglip_text.is_siglip(sd) and not siglip_text.is_siglip(fx.text_state_dict())
  arrays = siglip_text.to_clip_names(sd, "tiny")
  assert float(arrays["logit_bias"]) == -10.0
  np.testing.assert_allclose(np.exp(arrays["logit_scale"]), 10.0, rtol=1e-6)
  assert not any(k.startswith(("vision_model.", "text_model.")) for k in arrays)


def test_a_missing_projection_is_named():
  sd = fx.siglip_state_dict()
  del sd["text_model.encoder.layers.1.self_attn.k_proj.weight"]
  key = r"'text_model\.encoder\.layers\.1\.self_attn\.k_proj\.weight'"
  with pytest.raises(errors.UserError, match=r"lacks SigLIP's text " + key):
    siglip_text.to_clip_names(sd, "tiny.safetensors")
