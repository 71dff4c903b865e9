"""RepAdapter (methods/repadapter.py) against the NumPy float64 reference of the official code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reparam_fixtures
from vpt_jax.methods import repadapter

SETTINGS = {"dim": 4, "groups": 2, "scale": 0.7, "dropout": 0.1, "drop_path": 0.1}


@pytest.mark.numerics
def test_repadapter_matches_numpy_reference():
  reparam_fixtures.assert_matches_numpy(reparam_fixtures.tiny_model("repadapter", SETTINGS),
                                        repadapter_scale=0.7)


def test_count_at_vit_b16():
  # Per adapter: conv_A 768 x 8 + 8, grouped conv_B 768 x 8 / 2 + 768; two per block.
  # Weights alone: 24 x 9,216 = 221,184, the paper's (and V-PETL Bench's) 0.22M.
  settings = {**SETTINGS, "dim": 8}
  assert reparam_fixtures.b16_count("repadapter", settings, repadapter.REPADAPTER_PARAMS) == (
      24 * (768 * 8 + 8 + 768 * 4 + 768)) == 239_808
  weights = r"Transformer/encoderblock_\d+/repadapter_(attention|mlp)/(down|up)/kernel"
  assert reparam_fixtures.b16_count("repadapter", settings, weights) == 221_184



def test_init_follows_the_official_code():
  # conv_A xavier_uniform (fans D and h), zero biases, conv_B zero: starts as identity.
  adapter = repadapter.RepAdapter(dim=8, groups=2, scale=1.0, dropout=0.1)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 768)), jnp.float32)
  params = adapter.init(jax.random.key(0), x, train=False)["params"]
  bound = np.sqrt(6 / (768 + 8))
  down = np.asarray(params["down"]["kernel"])
  assert down.shape == (768, 8) and bound * 0.95 < np.abs(down).max() <= bound
  assert params["up"]["kernel"].shape == (2, 4, 384)
  for leaf in (params["down"]["bias"], params["up"]["kernel"], params["up"]["bias"]):
    assert not np.any(np.asarray(leaf))
  np.testing.assert_array_equal(np.asarray(adapter.apply({"params": params}, x, train=False)),
                                np.asarray(x))
