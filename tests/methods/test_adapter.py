"""Pfeiffer adapters (methods/adapter.py) against the NumPy float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
from vpt_jax.methods import adapter
from vpt_jax.models import vit
from vpt_jax.params import trees

pytestmark = pytest.mark.numerics  # run again under SSE4.2 in CI

BASE = fixtures.TINY_VIT
WIDTH = 16


@pytest.mark.parametrize("init", adapter.ADAPTER_INITS)
def test_adapter_matches_numpy_and_starts_at_the_backbone(init):
  options = adapter.AdapterOptions(reduction=4, init=init)
  model = vit.VisionTransformer(**BASE, hooks=options)
  params = fixtures.random_params(model)
  # Random adapter values: the math.
  fixtures.assert_matches_numpy(model, params, fixtures.uniform_images())
  assert {p.split("/adapter/")[1] for p in trees.flatten(params) if "/adapter/" in p} == {
      "down/kernel", "down/bias", "up/kernel", "up/bias"}
  initial = adapter.Adapter(4, init).init(jax.random.key(0), jnp.zeros((1, 1, WIDTH)))
  for path, value in trees.flatten(initial["params"]).items():
    # Up (and every bias) starts at zero, so the model starts at the backbone;
    # the reference also zeroes Down's kernel.
    zero_expected = init == "vpt_reference" or path.startswith("up/") or path.endswith("bias")
    assert np.all(np.asarray(value) == 0) == zero_expected, path
