"""The prompt methods' additions to VPT (methods/prompts.py: VFPT's Fourier
prompts, E2VPT's key-value prompts) against the NumPy float64 reference; VPT
itself is covered by test_vit_forward.py."""

from __future__ import annotations

import pytest

import checkpoint_fixtures as fixtures
from vpt_jax.methods import prompts
from vpt_jax.models import vit

pytestmark = pytest.mark.numerics  # run again under SSE4.2 in CI

BASE = fixtures.TINY_VIT
DEPTH = 2


@pytest.mark.parametrize("dimension", ["all", "hidden", "sequence"])
def test_vfpt_matches_numpy(dimension):
  model = vit.VisionTransformer(
      **BASE, hooks=prompts.VfptOptions(4, deep=True, percentage=0.5, dimension=dimension))
  fixtures.assert_matches_numpy(model, fixtures.random_params(model), fixtures.uniform_images(),
                                fourier_prompts=2, fourier_dimension=dimension)


def test_e2vpt_matches_numpy():
  model = vit.VisionTransformer(**BASE,
                                hooks=prompts.E2vptOptions(3, deep=True, kv_prompts=2))
  params = fixtures.random_params(model)
  assert params["e2vpt"]["kv_prompts"].shape == (DEPTH, 2, 2, 8)  # (L, H, N_kv, D/H)
  fixtures.assert_matches_numpy(model, params, fixtures.uniform_images())
