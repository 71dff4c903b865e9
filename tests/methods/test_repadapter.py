"""RepAdapter (methods/repadapter.py) against the NumPy float64 reference of the official code."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_reparam
import reparam_fixtures
import tolerances
from vpt_jax.methods import repadapter

SETTINGS = {"dim": 4, "groups": 2, "scale": 0.7, "dropout": 0.1, "drop_path": 0.1}


@pytest.mark.numerics
def test_repadapter_matches_numpy_reference():
  model = reparam_fixtures.tiny_model("repadapter", SETTINGS)
  params = fixtures.random_params(model)
  images = fixtures.uniform_images()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, images)),
                             numpy_reparam.vit_forward(params, images, repadapter_scale=0.7),
                             **tolerances.FORWARD_VS_NUMPY)


def test_count_at_vit_b16():
  # Per adapter: conv_A 768 x 8 + 8, grouped conv_B 768 x 8 / 2 + 768; two per block.
  # Weights alone: 24 x 9,216 = 221,184, the paper's (and V-PETL Bench's) 0.22M.
  settings = {**SETTINGS, "dim": 8}
  assert reparam_fixtures.b16_count("repadapter", settings, repadapter.REPADAPTER_PARAMS) == (
      24 * (768 * 8 + 8 + 768 * 4 + 768)) == 239_808
  weights = r"Transformer/encoderblock_\d+/repadapter_(attention|mlp)/(down|up)/kernel"
  assert reparam_fixtures.b16_count("repadapter", settings, weights) == 221_184

