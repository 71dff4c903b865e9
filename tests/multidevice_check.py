"""Runs a few VPT-deep steps on a 1-device and a 4-device mesh; prints JSON.

On four devices it also runs with the optimizer state split over them
(``optim.shard_state``), reports how the state's leaves were split, and
restores a checkpoint of that state into a replicated state.

Started by training/test_steps.py in a subprocess, because the emulated device
count (XLA_FLAGS=--xla_force_host_platform_device_count=4) must be set before
JAX starts.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from vpt_jax.checkpoints import train_state as ckpt_lib
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.training import optimizers
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import steps


def trajectory(devices, num_steps=4, batch_size=8, shard_optimizer=False):
  """(losses, final params by path, final state, labels) of the library's jitted step."""
  spec = dict(method="vpt_deep", variant="test/4", image_size=16, dropout_rate=0.1,
              skip_dead_work=True, dtype="float32", num_prompts=3, prompt_dropout=0.1,
              prompt_projection=-1, pool="original")
  model = factory.build_model(spec, 5)
  mesh = mesh_lib.make_data_mesh(devices)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  labels = freezing.label_params(params, registry.get_method("vpt_deep").trainable_rules)
  schedule = lambda step: 0.1
  tx = optimizers.make_optimizer(labels, name="sgd", learning_rate=schedule,
                                 weight_decay=1e-4)
  # Placed as training/setup places it (a split state is built in its slices).
  state = mesh_lib.place_train_state(tx.init, mesh_lib.put_replicated(params, mesh), params,
                                     mesh, shard_optimizer=shard_optimizer)
  step_fn = mesh_lib.jit_train_step(
      steps.make_train_step(model, labels, tx, schedule, mean=(0.5,) * 3, std=(0.25,) * 3),
      mesh, state_shardings=mesh_lib.shardings_of(state))
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(num_steps):
    batch = {"image": rng.integers(0, 256, (batch_size, 16, 16, 3), dtype=np.uint8),
             "label": rng.integers(0, 5, (batch_size,)).astype(np.int32)}
    state, metrics = step_fn(state, mesh_lib.global_batch(mesh, batch), jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return losses, trees.flatten(jax.device_get(state["params"])), state, labels


def max_diff(left: dict, right: dict) -> float:
  return max(float(np.max(np.abs(left[k] - right[k]))) for k in left)


def split_report(state) -> list:
  """[global shape, one device's shard shape] of every optimizer-state array."""
  return [[list(leaf.shape), list(leaf.addressable_shards[0].data.shape)]
          for leaf in jax.tree.leaves(state["opt_state"])]


def restores_into_replicated(state, labels, mesh) -> bool:
  """Saves the (split) state and restores it into a replicated one: equal bit for bit?"""
  replicated = mesh_lib.put(jax.device_get(state), jax.tree.map(
      lambda _: mesh_lib.replicated(mesh), state))
  with tempfile.TemporaryDirectory() as directory:
    manager = ckpt_lib.open_manager(directory, keep=1, every_steps=1)
    ckpt_lib.save(manager, state, labels)
    ckpt_lib.wait_until_saved(manager)
    restored = ckpt_lib.restore_latest(manager, replicated, labels)
  equal = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                       jax.device_get(restored["opt_state"]), jax.device_get(state["opt_state"]))
  return (all(jax.tree.leaves(equal))
          and all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(restored)))


def main():
  devices = jax.devices()
  one_losses, one_params, _, _ = trajectory(devices[:1])
  four_losses, four_params, _, _ = trajectory(devices[:4])
  split_losses, split_params, split_state, labels = trajectory(devices[:4],
                                                               shard_optimizer=True)
  largest = max(float(np.max(np.abs(one_params[k]))) for k in one_params)
  print(json.dumps({"devices": [1, len(devices[:4])], "losses": [one_losses, four_losses],
                    "max_param_diff": max_diff(one_params, four_params), "max_param": largest,
                    "split_losses": split_losses,
                    "split_max_param_diff": max_diff(four_params, split_params),
                    "split_shapes": split_report(split_state),
                    "split_restores": restores_into_replicated(
                        split_state, labels, mesh_lib.make_data_mesh(devices[:4]))}))


if __name__ == "__main__":
  main()
