"""FacT-TT and FacT-TK (methods/fact.py) against the NumPy float64 reference of the official code."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reparam_fixtures
from vpt_jax.methods import fact
from vpt_jax.protocol import hparams

SETTINGS = {"rank": 3, "scale": 1.7, "dropout": 0.1, "drop_path": 0.1}


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["fact_tt", "fact_tk"])
def test_fact_matches_numpy_reference(method):
  # V random too, so the update is not zero.
  reparam_fixtures.assert_matches_numpy(reparam_fixtures.tiny_model(method, SETTINGS),
                                        fact_scale=1.7)


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



@pytest.mark.parametrize("kind", ["tt", "tk"])
def test_factor_init_follows_the_official_code(kind):
  # FacTu: torch Linear default, U(+-1/sqrt(D)); FacTv zeros; TT cores Linear
  # defaults U(+-1/sqrt(fan_in)); TK xavier_uniform: FacTc (r, r, r) fans r^2 and
  # r^2 -> sqrt(6 / 2r^2), FacTp (r, 12 L) -> sqrt(6 / (12 L + r)).
  rank, depth, width = 8, 12, 768
  factors = fact.FactFactors(kind, rank, depth, width, 4)
  params = factors.init(jax.random.key(0), jnp.float32)["params"]
  bounds = {"u": 1 / np.sqrt(width)}
  if kind == "tt":
    bounds.update({"query": 1 / np.sqrt(rank), "Dense_0": 1 / np.sqrt(rank),
                   "Dense_1": 1 / np.sqrt(4 * rank)})
  else:
    bounds.update({"c": np.sqrt(6 / (2 * rank ** 2)), "p": np.sqrt(6 / (12 * depth + rank))})
  for name, bound in bounds.items():
    values = np.asarray(params[name])
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.95 * bound, name
    assert abs(values.std() - bound / np.sqrt(3)) < 0.1 * bound, name  # uniform's std
  assert not np.any(np.asarray(params["v"]))
