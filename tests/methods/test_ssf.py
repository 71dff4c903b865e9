"""SSF (methods/ssf.py) against the NumPy float64 reference of the official placement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import reparam_fixtures
from vpt_jax.methods import ssf
from vpt_jax.models import vit
from vpt_jax.params import trees


def _model():
  return vit.VisionTransformer(**fixtures.TINY_VIT, hooks=ssf.SsfOptions())


@pytest.mark.numerics
def test_ssf_matches_numpy_reference():
  reparam_fixtures.assert_matches_numpy(_model())


def test_ssf_placement():
  flat = trees.flatten(fixtures.param_shapes(_model(), 16))
  pairs = sorted({p.rsplit("/", 1)[0] for p in flat if "/ssf_" in "/" + p})
  block = "Transformer/encoderblock_0/"
  assert [p for p in pairs if p.startswith(block)] == [
      block + "MlpBlock_0/ssf_Dense_0", block + "MlpBlock_0/ssf_Dense_1",
      block + "MultiHeadDotProductAttention_0/ssf_key",
      block + "MultiHeadDotProductAttention_0/ssf_out",
      block + "MultiHeadDotProductAttention_0/ssf_query",
      block + "MultiHeadDotProductAttention_0/ssf_value",
      block + "ssf_LayerNorm_0", block + "ssf_LayerNorm_1"]
  assert len(pairs) == 2 * 8 + 2  # + the patch embedding and encoder_norm
  assert "ssf_embedding" in pairs and "Transformer/ssf_encoder_norm" in pairs


def test_ssf_init_draws_the_official_normals():
  # init_ssf_scale_shift: scale ~ N(1, 0.02^2), shift ~ N(0, 0.02^2); 4,096 draws each.
  params = ssf.ScaleShift((4096,)).init(jax.random.key(0), jnp.zeros((1, 4096)))["params"]
  scale, shift = np.asarray(params["scale"]), np.asarray(params["shift"])
  assert abs(scale.mean() - 1.0) < 0.002 and abs(scale.std() - 0.02) < 0.002
  assert abs(shift.mean()) < 0.002 and abs(shift.std() - 0.02) < 0.002
  assert not np.array_equal(scale - 1.0, shift)  # independent draws


def test_ssf_trainable_count_at_vit_b16():
  # Per block: qkv 3D, proj D, fc1 4D, fc2 D, norm1 D, norm2 D -> 11 D pairs; plus
  # the patch embedding and the final norm: 2 x (12 x 11 + 2) x 768 = 205,824,
  # the 0.21M V-PETL Bench lists for SSF (shared/reference/cvpt.md, table 351).
  assert reparam_fixtures.b16_count("ssf", {"drop_path": 0.1}, ssf.SSF_PARAMS) == (
      2 * (12 * 11 + 2) * 768) == 205_824

