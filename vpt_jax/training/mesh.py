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

  Everything is replicated, except the optimizer state with ``shard_optimizer``
  (``optimizer_state_shardings``).
  """
  shardings = jax.tree.map(lambda _: replicated(mesh), state)
  shardings["opt_state"] = optimizer_state_shardings(state["opt_state"], mesh,
                                                     shard_optimizer=shard_optimizer)
  return shardings


def optimizer_state_shardings(opt_state, mesh: Mesh, *, shard_optimizer: bool):
  """A NamedSharding per optimizer-state leaf (arrays or shape structs).

  Replicated, or with ``shard_optimizer`` each leaf split along ``split_axis``
  over the "data" axis (ZeRO stage 1). The step then reduce-scatters the
  gradients, updates its slice of the moments and all-gathers the new
  parameters: per device, 1/devices of the optimizer's memory and update
  work, for two collectives as large as the parameters instead of one.
  """
  if not shard_optimizer:
    return jax.tree.map(lambda _: replicated(mesh), opt_state)

  def leaf_sharding(leaf):
    axis = split_axis(np.shape(leaf), mesh.devices.size)
    spec = [None] * np.ndim(leaf)
    if axis is not None:
      spec[axis] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))
  return jax.tree.map(leaf_sharding, opt_state)


def place_train_state(init_optimizer: Callable, params, host_params, mesh: Mesh, *,
                      shard_optimizer: bool) -> dict:
  """{"step": 0, "params", "opt_state"} on the mesh, as training starts.

  ``params`` are ``host_params`` already replicated on the mesh. The optimizer
  state ``init_optimizer`` gives them is, replicated, built eagerly from
  ``host_params`` (identical host arrays on every process; compiling the init
  would cost seconds and save nothing). Split (``shard_optimizer``), a jitted
  init on the placed ``params`` writes each device's slice where it lives, so
  no device ever holds the whole state, which is the point of splitting it.
  """
  shardings = optimizer_state_shardings(jax.eval_shape(init_optimizer, host_params), mesh,
                                        shard_optimizer=shard_optimizer)
  if shard_optimizer:
    opt_state = jax.jit(init_optimizer, out_shardings=shardings)(params)
  else:
    opt_state = put(init_optimizer(host_params), shardings)
  return {"step": put_replicated(np.zeros([], np.int32), mesh), "params": params,
          "opt_state": opt_state}


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
  whole = replicated(mesh)
  state_shardings = whole if state_shardings is None else state_shardings
  return jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=((state_shardings,) + (whole,) * replicated_inputs
                               + (batch_sharded(mesh), whole)),
                 out_shardings=(state_shardings, whole))
