"""models/clip_text: CLIP's text tower (causal pre-LN transformer, QuickGELU,
end-of-text pooling, projection) against an independent float64 NumPy forward."""

from __future__ import annotations

import numpy as np
import pytest

import clip_text_fixtures as fx
import tolerances
from vpt_jax import errors
from vpt_jax.models import clip_text


def _tokens():
  """Three sequences of different lengths: start, words, end, zero padding."""
  texts = ("a photo of a cat.", "dog", "a big red car of the dog")
  tokens = np.zeros((len(texts), fx.CONTEXT), np.int32)
  for i, text in enumerate(texts):
    ids = [fx.START_ID] + fx.toy_encode(text) + [fx.END_ID]
    tokens[i, :len(ids)] = ids
  return tokens


@pytest.mark.numerics
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_text_tower_matches_numpy(activation):
  sd = fx.text_state_dict()
  arrays = clip_text.text_arrays(sd, "tiny")
  got = np.asarray(clip_text.encode_text(arrays, _tokens(), num_heads=fx.HEADS,
                                         activation=activation))
  expected = fx.numpy_encode_text(sd, _tokens(), quick_gelu=activation == "quick_gelu")
  np.testing.assert_allclose(got, expected, **tolerances.FORWARD_VS_NUMPY)


def test_the_text_tower_is_causal_and_pools_the_end_token():
  """Tokens after the end token (padding) change nothing; tokens before it do."""
  arrays = clip_text.text_arrays(fx.text_state_dict(), "tiny")
  tokens = _tokens()[:1]
  padded = tokens.copy()
  padded[0, -1] = 3  # a word id after the end token (below END_ID: not pooled)
  earlier = tokens.copy()
  earlier[0, 2] = 7
  encode = lambda t: np.asarray(clip_text.encode_text(arrays, t, num_heads=fx.HEADS))
  np.testing.assert_array_equal(encode(padded), encode(tokens))
  assert np.abs(encode(earlier) - encode(tokens)).max() > 1e-3


def test_only_the_text_keys_are_kept_and_the_logit_scale_read():
  arrays = clip_text.text_arrays(fx.text_state_dict(logit_scale=np.log(50.0)), "tiny")
  assert not any(k.startswith("visual.") for k in arrays)
  assert clip_text.num_layers(arrays) == fx.LAYERS
  np.testing.assert_allclose(np.exp(arrays["logit_scale"]), 50.0, rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("ln_final.bias"), "lacks the CLIP text tower's 'ln_final.bias'"),
    (lambda sd: sd.pop("transformer.resblocks.1.mlp.c_fc.bias"), "resblocks.1.mlp.c_fc.bias"),
    (lambda sd: sd.update({"transformer.resblocks.0.attn.in_proj_weight": np.zeros((16, 16))}),
     r"in_proj_weight has shape \(16, 16\)"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("transformer.")],
     "resblocks.0"),
])
def test_missing_or_misshapen_keys_are_named(change, message):
  sd = fx.text_state_dict()
  change(sd)
  with pytest.raises(errors.UserError, match=message):
    clip_text.text_arrays(sd, "tiny.pt")


def test_heads_that_do_not_divide_the_width_are_refused():
  arrays = clip_text.text_arrays(fx.text_state_dict(), "tiny")
  with pytest.raises(errors.UserError, match="text_heads"):
    clip_text.encode_text(arrays, _tokens(), num_heads=3)
  with pytest.raises(errors.UserError, match="text_heads"):
    clip_text.encode_text(arrays, _tokens())  # width 16 // 64 = 0 heads
