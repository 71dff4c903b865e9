"""LoRA (methods/lora.py) against the NumPy float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_vit
import tolerances
from vpt_jax.methods import lora
from vpt_jax.models import vit
from vpt_jax.params import trees

pytestmark = pytest.mark.numerics  # run again under SSE4.2 in CI

TOLERANCE = tolerances.FORWARD_VS_NUMPY
BASE = fixtures.TINY_VIT


def test_lora_matches_numpy_and_starts_exact():
  options = lora.LoraOptions(rank=2, alpha=3.0, targets=("query", "key", "value", "out"))
  model = vit.VisionTransformer(**BASE, hooks=options)
  params = fixtures.random_params(model)
  fixtures.assert_matches_numpy(model, params, fixtures.uniform_images(), lora_alpha=3.0)
  # B = 0: the LoRA model equals the plain one whatever A is.
  flat = trees.flatten(params)
  zeroed = trees.unflatten({p: (np.zeros_like(v) if p.endswith("/b") else v)
                                for p, v in flat.items()})
  plain = trees.unflatten({p: v for p, v in flat.items() if "lora_" not in p})
  np.testing.assert_allclose(np.asarray(model.apply({"params": zeroed}, fixtures.uniform_images())),
                             numpy_vit.vit_forward(plain, fixtures.uniform_images()), **TOLERANCE)
