"""FacT-TT and FacT-TK (methods/fact.py) against the NumPy float64 reference of the official code."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_reparam
import reparam_fixtures
import tolerances
from vpt_jax.methods import fact
from vpt_jax.protocol import hparams

SETTINGS = {"rank": 3, "scale": 1.7, "dropout": 0.1, "drop_path": 0.1}


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_fact_matches_numpy_reference(method):
  model = reparam_fixtures.tiny_model(method, SETTINGS)
  params = fixtures.random_params(model)  # V random too, so the update is not zero
  images = fixtures.uniform_images()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, images)),
                             numpy_reparam.vit_forward(params, images, fact_scale=1.7),
                             **tolerances.FORWARD_VS_NUMPY)


@functools.lru_cache(maxsize=None)
def _b16(method: str, rank: int) -> int:
  return reparam_fixtures.b16_count(method, {**SETTINGS, "rank": rank}, fact.FACT_PARAMS)


def test_counts_at_vit_b16_average_to_the_papers():
  # Closed forms: TT 2 D r + L (4 r^2 + 4 r^2 + 4 r^2); TK 2 D r + 12 L r + r^3.
  assert _b16("fact_tt", 8) == 2 * 768 * 8 + 12 * 12 * 64 == 21_504
  assert _b16("fact_tk", 32) == 2 * 768 * 32 + 144 * 32 + 32 ** 3 == 86_528
  # Averaged over the official per-task ranks (FacT/configs), the FacT paper's
  # Table 1: FacT-TT 0.040M, FacT-TK 0.069M (V-PETL Bench: 0.07M).
  for method, paper in (("fact_tt", 0.040), ("fact_tk", 0.069)):
    ranks = [rank for rank, _ in hparams.FACT_TASKS[method].values()]
    mean = np.mean([_b16(method, rank) for rank in ranks]) / 1e6
    assert round(mean, 3) == paper, (method, mean)

