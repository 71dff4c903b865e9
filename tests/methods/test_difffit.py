"""DiffFit and LN-tune (methods/difffit.py) against the NumPy float64 reference."""

from __future__ import annotations

import pytest

import reparam_fixtures
from vpt_jax.methods import base
from vpt_jax.methods import difffit
from vpt_jax.methods import reparam_common

SETTINGS = {"drop_path": 0.1}


@pytest.mark.numerics
def test_difffit_matches_numpy_reference():
  reparam_fixtures.assert_matches_numpy(reparam_fixtures.tiny_model("difffit", SETTINGS))


def test_counts_at_vit_b16():
  # Closed forms at D = 768, 12 blocks, 25 LayerNorms (OSU's "norm" modules):
  # LN-tune 25 x 2 x 768 = 38,400; DiffFit adds every bias (patch embedding D;
  # per block q, k, v, out, fc1 (4D), fc2 -> 9D) and gamma1, gamma2 (2D per block).
  d = 768
  assert reparam_fixtures.b16_count("ln_tune", SETTINGS,
                                    reparam_common.LAYER_NORM_PARAMS) == 25 * 2 * d == 38_400
  trained = f"({base.BIAS_PARAMS})|({reparam_common.LAYER_NORM_PARAMS})|({difffit.GAMMA_PARAMS})"
  count = reparam_fixtures.b16_count("difffit", SETTINGS, f"(?!head/)({trained})")
  assert count == 25 * 2 * d + d + 12 * 9 * d + 12 * 2 * d == 140_544


