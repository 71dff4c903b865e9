"""Side-tuning (methods/sidetune.py) against the NumPy float64 reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
from vpt_jax.methods import sidetune
from vpt_jax.models import vit

pytestmark = pytest.mark.numerics  # run again under SSE4.2 in CI

BASE = fixtures.TINY_VIT
WIDTH = 16


def test_sidetune_matches_numpy_and_starts_as_an_even_blend():
  model = vit.VisionTransformer(**BASE, hooks=sidetune.SideOptions((4, 8)))
  params = fixtures.random_params(model)
  fixtures.assert_matches_numpy(model, params, fixtures.uniform_images())
  initial = sidetune.SideNetwork((4, 8)).init(jax.random.key(0), fixtures.uniform_images(),
                                              np.zeros((2, WIDTH), np.float32))
  assert float(initial["params"]["alpha"]) == 0.0  # sigmoid(0) = 1/2
