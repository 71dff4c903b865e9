"""Device mesh and sharding for data-parallel training (jit + NamedSharding)."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vpt_jax import errors

DATA_AXIS = "data"


def make_data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (global) devices with the axis "data"."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Parameters and optimizer state: a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def put_replicated(tree, mesh: Mesh):
  """Host arrays (identical on every process) -> replicated global jax.Arrays."""
  return put(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def put(tree, shardings):
  """Host or device arrays (identical on every process) -> global jax.Arrays.

  ``shardings``: a NamedSharding per leaf of ``tree``. ``jax.device_put`` only
  reaches this process's devices, so with several processes each array is
  built from a callback that slices this process's part.
  """
  if jax.process_count() == 1:
    # Device arrays move directly. Built from callbacks, the new arrays would
    # keep NumPy views of device-array sources, so the first step could not
    # donate them and would hold a second copy of the state.
    return jax.device_put(tree, shardings)
  return jax.tree.map(
      lambda x, sharding: jax.make_array_from_callback(
          np.shape(x), sharding, lambda index, x=x: np.asarray(x)[index]), tree, shardings)


def split_axis(shape, num_devices: int):
  """The axis an optimizer-state leaf of ``shape`` is split along, or None.

  The largest axis whose size the device count divides (the earliest among
  equals), so every device holds an equal slice; None (replicated) for
  scalars, for leaves no axis of which divides, and on one device.
  """
  if num_devices == 1:
    return None
  fitting = [axis for axis, size in enumerate(shape) if size % num_devices == 0]
  return max(fitting, key=lambda axis: (shape[axis], -axis)) if fitting else None


def train_state_shardings(state, mesh: Mesh, *, shard_optimizer: bool) -> dict:
  """A NamedSharding per leaf of a train state {"step", "params", "opt_state", ...}.

  Everything is replicated, except, with ``shard_optimizer``, the optimizer
  state: each leaf is split along ``split_axis`` over the "data" axis (ZeRO
  stage 1). The step then reduce-scatters the gradients, updates its slice of
  the moments and all-gathers the new parameters: per device, 1/devices of
  the optimizer's memory and update work, for two collectives as large as the
  parameters instead of one.
  """
  shardings = jax.tree.map(lambda _: replicated(mesh), state)
  if shard_optimizer:
    def leaf_sharding(leaf):
      axis = split_axis(np.shape(leaf), mesh.devices.size)
      spec = [None] * np.ndim(leaf)
      if axis is not None:
        spec[axis] = DATA_AXIS
      return NamedSharding(mesh, PartitionSpec(*spec))
    shardings["opt_state"] = jax.tree.map(leaf_sharding, state["opt_state"])
  return shardings


def place_optimizer_state(init_optimizer: Callable, params, host_params, mesh: Mesh, *,
                          shard_optimizer: bool):
  """The optimizer state ``init_optimizer`` gives the parameters, on the mesh.

  Replicated, it is built eagerly from ``host_params`` (identical host arrays
  on every process; compiling the init would cost seconds and save nothing).
  Split (``shard_optimizer``), a jitted init on the placed ``params`` writes
  each device's slice where it lives, so no device ever holds the whole
  state, which is the point of splitting it.
  """
  abstract = jax.eval_shape(init_optimizer, host_params)
  shardings = train_state_shardings({"opt_state": abstract}, mesh,
                                    shard_optimizer=shard_optimizer)["opt_state"]
  if shard_optimizer:
    return jax.jit(init_optimizer, out_shardings=shardings)(params)
  return put(init_optimizer(host_params), shardings)


def shardings_of(tree):
  """The sharding of every jax.Array leaf of ``tree``."""
  return jax.tree.map(lambda leaf: leaf.sharding, tree)


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Batches: the leading axis split over the "data" axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """This process's rows -> one global jax.Array per key, sharded over "data".

  Every process passes its own (local_batch_size, ...) arrays; the global
  leading dimension is the sum over processes.
  """
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  """Raises before any compute if the batch cannot be split over the devices."""
  devices = mesh.devices.size
  if global_batch_size % devices or global_batch_size % jax.process_count():
    raise errors.UserError(
        f"batch size {global_batch_size} is not divisible by the {devices} devices "
        f"({jax.process_count()} processes); use a multiple of {devices}")


def jit_train_step(train_step: Callable, mesh: Mesh, *, state_shardings=None,
                   replicated_inputs: int = 0) -> Callable:
  """``train_step(state, *inputs, batch, rng) -> (state, metrics)`` compiled for the mesh.

  The state is donated and keeps ``state_shardings`` (a sharding per leaf, e.g.
  ``shardings_of(state)``; None = replicated) from step to step; the
  ``replicated_inputs`` inputs, the rng and the metrics are replicated; the
  batch is split over the devices.
  """
  copy = replicated(mesh)
  state_shardings = copy if state_shardings is None else state_shardings
  return jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=((state_shardings,) + (copy,) * replicated_inputs
                               + (batch_sharded(mesh), copy)),
                 out_shardings=(state_shardings, copy))
