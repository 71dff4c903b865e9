"""Schedules, weight-decay masks and optimizer state against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt_jax.training import optimizers
from vpt_jax.params import freezing

VPT_RULES = (("vpt/.*", "train"), ("head/.*", "train"), (".*", "frozen"))


def _toy_params():
  return {"head": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
          "vpt": {"shallow": jnp.full((3, 2), 2.0)},
          "embedding": {"kernel": jnp.full((4,), 2.0)}}


def test_scaled_learning_rate_is_linear_in_batch():
  assert optimizers.scaled_learning_rate(0.1, 128) == pytest.approx(0.05)
  assert optimizers.scaled_learning_rate(25.0, 128) == pytest.approx(12.5)  # SUN397 demo


def test_epoch_schedule_matches_reference_multiplier():
  # W=10, T=100, 8 steps per epoch (1,000 images, batch 125).
  schedule = optimizers.make_schedule(1.0, warmup_epochs=10, total_epochs=100,
                                      steps_per_epoch=8, unit="epoch")
  expected = {0: 0.0, 7: 0.0,            # the whole first epoch trains at lr 0
              8: 0.1, 15: 0.1,           # epoch 1: 1/10, constant within the epoch
              80: 1.0,                   # epoch 10: cos(0)
              440: 0.5,                  # epoch 55: 0.5 * (1 + cos(pi / 2))
              799: 0.5 * (1 + math.cos(math.pi * 89 / 90))}  # epoch 99
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step


def test_step_schedule_is_smooth_within_an_epoch():
  schedule = optimizers.make_schedule(2.0, warmup_epochs=10, total_epochs=100,
                                      steps_per_epoch=8, unit="step")
  assert float(schedule(4)) == pytest.approx(2.0 * 0.5 / 10)
  assert float(schedule(8 * 55)) == pytest.approx(1.0)


def test_sgd_coupled_l2_skips_head_bias_and_frozen_leaves():
  params = _toy_params()
  labels = freezing.label_params(params, VPT_RULES)
  tx = optimizers.make_optimizer(labels, name="sgd", learning_rate=lambda s: 0.1,
                                 weight_decay=0.5, momentum=0.9)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  # Step 1: buf = g + wd * theta = 1 + 0.5 * 2 = 2 (head bias: 1); update -lr * buf.
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["vpt"]["shallow"], -0.2)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.2)
  np.testing.assert_allclose(updates["head"]["bias"], -0.1)
  np.testing.assert_array_equal(updates["embedding"]["kernel"], 0.0)
  # Step 2 with the same theta: buf = 0.9 * 2 + 2 = 3.8.
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["vpt"]["shallow"], -0.38, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"], -0.19, rtol=1e-6)


def test_timm_adamw_decays_only_what_is_more_than_1d_in_torch():
  # timm's param_groups_weight_decay (SSF's optimizer): biases and 1-D tensors
  # get no decay; our q/k/v biases and SSF vectors of q/k/v are (H, D/H), 1-D in torch.
  params = {"head": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
            "query": {"bias": jnp.full((2, 2), 2.0)},
            "ssf_query": {"scale": jnp.full((2, 2), 2.0), "shift": jnp.full((2, 2), 2.0)}}
  labels = jax.tree.map(lambda _: "train", params)
  tx = optimizers.make_optimizer(labels, name="timm_adamw", learning_rate=lambda s: 0.1,
                                 weight_decay=0.5)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is -lr * g / (|g| + eps) = -0.1; decay adds -lr * wd * theta = -0.1.
  np.testing.assert_allclose(updates["head"]["kernel"], -0.2, rtol=1e-5)
  for leaf in (updates["head"]["bias"], updates["query"]["bias"],
               updates["ssf_query"]["scale"], updates["ssf_query"]["shift"]):
    np.testing.assert_allclose(leaf, -0.1, rtol=1e-5)


def test_hf_adamw_matches_hand_computation():
  params = _toy_params()
  labels = freezing.label_params(params, (("head/.*", "train"), (".*", "frozen")))
  tx = optimizers.make_optimizer(labels, name="adamw", learning_rate=lambda s: 0.1,
                                 weight_decay=1e-4)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, _ = tx.update(grads, state, params)
  # t=1: mu = 0.05, nu = 0.00025; step size sqrt(1-0.999)/(1-0.9).
  direction = (math.sqrt(0.001) / 0.1) * 0.05 / (math.sqrt(0.00025) + 1e-6)
  step = -0.1 * direction
  # Kernel: decayed after the Adam step, theta' = (2 + step) * (1 - 0.1 * 0.01).
  np.testing.assert_allclose(updates["head"]["kernel"], (2 + step) * (1 - 1e-3) - 2,
                             rtol=1e-5)
  np.testing.assert_allclose(updates["head"]["bias"], step, rtol=1e-5)  # bias: no decay
  np.testing.assert_array_equal(updates["vpt"]["shallow"], 0.0)


def test_optimizer_state_exists_only_for_trainable_leaves():
  params = _toy_params()
  labels = freezing.label_params(params, VPT_RULES)
  tx = optimizers.make_optimizer(labels, name="sgd", learning_rate=lambda s: 0.1,
                                 weight_decay=1e-4)
  state = tx.init(params)
  arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  # One momentum buffer per trainable leaf (head kernel, head bias, prompts).
  assert sorted(x.size for x in arrays) == [2, 4, 6]
  assert sum(x.nbytes for x in arrays) == (2 + 4 + 6) * 4


def test_unknown_optimizer_and_schedule_unit_fail():
  labels = freezing.label_params(_toy_params(), VPT_RULES)
  with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
    optimizers.make_optimizer(labels, name="adam", learning_rate=lambda s: 0.1,
                              weight_decay=0.0)
  with pytest.raises(ValueError, match="schedule unit"):
    optimizers.make_schedule(1.0, warmup_epochs=1, total_epochs=2, steps_per_epoch=1,
                             unit="minute")
