"""SSF (methods/ssf.py) against the NumPy float64 reference of the official placement."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_reparam
import reparam_fixtures
import tolerances
from vpt_jax.methods import factory
from vpt_jax.methods import ssf
from vpt_jax.models import vit
from vpt_jax.params import trees

pytestmark = pytest.mark.numerics

TOLERANCE = tolerances.FORWARD_VS_NUMPY


def _model():
  return vit.VisionTransformer(**fixtures.TINY_VIT, hooks=ssf.SsfOptions())


def test_ssf_matches_numpy_reference():
  model = _model()
  params = fixtures.random_params(model)
  images = fixtures.uniform_images()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, images)),
                             numpy_reparam.vit_forward(params, images), **TOLERANCE)


def test_ssf_placement_and_init():
  model = _model()
  flat = trees.flatten(factory.init_variables(model, 16, seed=0)["params"])
  pairs = sorted({p.rsplit("/", 1)[0] for p in flat if "/ssf_" in "/" + p})
  block = "Transformer/encoderblock_0/"
  assert [p for p in pairs if p.startswith(block)] == [
      block + "MlpBlock_0/ssf_Dense_0", block + "MlpBlock_0/ssf_Dense_1",
      block + "MultiHeadDotProductAttention_0/ssf_key",
      block + "MultiHeadDotProductAttention_0/ssf_out",
      block + "MultiHeadDotProductAttention_0/ssf_query",
      block + "MultiHeadDotProductAttention_0/ssf_value",
      block + "ssf_LayerNorm_0", block + "ssf_LayerNorm_1"]
  assert "ssf_embedding" in pairs and "Transformer/ssf_encoder_norm" in pairs
  scales = np.concatenate([flat[p + "/scale"].ravel() for p in pairs])
  shifts = np.concatenate([flat[p + "/shift"].ravel() for p in pairs])
  # init_ssf_scale_shift: N(1, 0.02), N(0, 0.02); ~600 draws each.
  assert abs(scales.mean() - 1.0) < 0.01 and abs(scales.std() - 0.02) < 0.005
  assert abs(shifts.mean()) < 0.01 and abs(shifts.std() - 0.02) < 0.005


def test_ssf_trainable_count_at_vit_b16():
  # Per block: qkv 3D, proj D, fc1 4D, fc2 D, norm1 D, norm2 D -> 11 D pairs; plus
  # the patch embedding and the final norm: 2 x (12 x 11 + 2) x 768 = 205,824,
  # the 0.21M V-PETL Bench lists for SSF (shared/reference/cvpt.md, table 351).
  assert reparam_fixtures.b16_count("ssf", {"drop_path": 0.1}, ssf.SSF_PARAMS) == (
      2 * (12 * 11 + 2) * 768) == 205_824


def test_ssf_trains_only_its_scales_shifts_and_head():
  reparam_fixtures.assert_trains_only("ssf", {"drop_path": 0.1}, ssf.SSF_PARAMS)
