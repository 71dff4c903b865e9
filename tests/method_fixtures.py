"""Training a model a few steps on one batch, and checking that only its trainable leaves moved."""

import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.training import optimizers
from vpt_jax.training import steps

STEPS = 4


def train_steps(model, params, labels, batch, *, optimizer: str, learning_rate: float,
                weight_decay: float, normalization: dict, num_steps: int = STEPS,
                batch_stats=None):
  """``num_steps`` jitted train steps of ``model`` on one batch, the optimizer by name.

  Shared by the backbone families' tests. Returns (initial state, final state,
  losses), the states on the host.
  """
  tx = optimizers.make_optimizer(labels, name=optimizer,
                                 learning_rate=lambda step: learning_rate,
                                 weight_decay=weight_decay)
  state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": tx.init(params)}
  if batch_stats is not None:
    state["batch_stats"] = batch_stats
  step_fn = jax.jit(steps.make_train_step(model, labels, tx, lambda s: 0.0, **normalization))
  initial = jax.device_get(state)
  losses = []
  for _ in range(num_steps):
    state, metrics = step_fn(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return initial, jax.device_get(state), losses


def assert_only_trainable_changed(before: dict, after: dict, trainable) -> None:
  """Each flat path with ``trainable(path)`` moved; every other one is bit-identical."""
  for path, value in before.items():
    if trainable(path):
      assert not np.array_equal(value, after[path]), f"{path} did not train"
    else:
      np.testing.assert_array_equal(value, after[path], err_msg=f"{path} changed")
