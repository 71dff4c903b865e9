"""Device mesh and sharding for data-parallel training (jit + NamedSharding)."""

from __future__ import annotations

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
  """Host arrays (identical on every process) -> replicated global jax.Arrays.

  ``jax.device_put`` only reaches this process's devices, so with several
  processes each array is built from a callback.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    # Device arrays move directly. Built from callbacks, the new arrays would
    # keep NumPy views of device-array sources, so the first step could not
    # donate them and would hold a second copy of the state.
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                             lambda index, x=x: np.asarray(x)[index]), tree)


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
