"""The MLP-k head (methods/head_only.py, models/heads.py) against the NumPy float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_vit
import tolerances
from vpt_jax.models import vit

pytestmark = pytest.mark.numerics  # run again under SSE4.2 in CI

TOLERANCE = tolerances.FORWARD_VS_NUMPY
BASE = fixtures.TINY_VIT


def test_mlp_head_matches_numpy_in_eval():
  model = vit.VisionTransformer(**BASE, head_hidden_layers=2)
  variables = fixtures.randomize(
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3))), 4)
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])  # var > 0
  logits = np.asarray(model.apply(variables, fixtures.uniform_images()))
  np.testing.assert_allclose(
      logits, numpy_vit.vit_forward(variables["params"], fixtures.uniform_images(),
                                    batch_stats=variables["batch_stats"]), **TOLERANCE)
