"""Runs a few VPT-deep steps on a 1-device and a 4-device mesh; prints JSON.

Started by training/test_steps.py in a subprocess, because the emulated device
count (XLA_FLAGS=--xla_force_host_platform_device_count=4) must be set before
JAX starts.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.training import optimizers
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import steps


def trajectory(devices, num_steps=4, batch_size=8):
  spec = dict(method="vpt_deep", variant="test/4", image_size=16, dropout_rate=0.1,
              skip_dead_work=True, dtype="float32", num_prompts=3, prompt_dropout=0.1,
              prompt_projection=-1, pool="original")
  model = factory.build_model(spec, 5)
  mesh = mesh_lib.make_data_mesh(devices)
  replicated = mesh_lib.replicated(mesh)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  labels = freezing.label_params(params, registry.get_method("vpt_deep").trainable_rules)
  schedule = lambda step: 0.1
  tx = optimizers.make_optimizer(labels, name="sgd", learning_rate=schedule,
                                 weight_decay=1e-4)
  state = jax.device_put({"step": jnp.zeros([], jnp.int32), "params": params,
                          "opt_state": tx.init(params)}, replicated)
  step_fn = jax.jit(steps.make_train_step(model, labels, tx, schedule, mean=(0.5,) * 3,
                                          std=(0.25,) * 3),
                    donate_argnums=(0,),
                    in_shardings=(replicated, mesh_lib.batch_sharded(mesh), replicated),
                    out_shardings=(replicated, replicated))
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(num_steps):
    batch = {"image": rng.integers(0, 256, (batch_size, 16, 16, 3), dtype=np.uint8),
             "label": rng.integers(0, 5, (batch_size,)).astype(np.int32)}
    state, metrics = step_fn(state, mesh_lib.global_batch(mesh, batch), jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return losses, trees.flatten(jax.device_get(state["params"]))


def main():
  devices = jax.devices()
  one_losses, one_params = trajectory(devices[:1])
  four_losses, four_params = trajectory(devices[:4])
  diff = max(float(np.max(np.abs(one_params[k] - four_params[k]))) for k in one_params)
  largest = max(float(np.max(np.abs(one_params[k]))) for k in one_params)
  print(json.dumps({"devices": [1, len(devices[:4])], "losses": [one_losses, four_losses],
                    "max_param_diff": diff, "max_param": largest}))


if __name__ == "__main__":
  main()
