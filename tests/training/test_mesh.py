"""The data mesh's placement rules (training/mesh.py)."""

import numpy as np

from vpt_jax.training import mesh as mesh_lib


def test_split_axis_takes_the_largest_divisible_axis():
  assert mesh_lib.split_axis((768, 3072), 2) == 1
  assert mesh_lib.split_axis((3072, 768), 2) == 0
  assert mesh_lib.split_axis((12, 64, 768), 8) == 2
  assert mesh_lib.split_axis((768, 100), 8) == 0       # 100 is not a multiple of 8
  assert mesh_lib.split_axis((64, 64), 4) == 0          # the first of equals


def test_split_axis_keeps_what_does_not_divide_whole():
  assert mesh_lib.split_axis((), 2) is None             # step counts
  assert mesh_lib.split_axis((5,), 2) is None           # a 5-class head's bias
  assert mesh_lib.split_axis((768, 3072), 1) is None    # one device: nothing to split


def test_train_state_shardings_split_only_the_optimizer_state():
  mesh = mesh_lib.make_data_mesh()
  state = {"step": np.zeros([], np.int32), "params": {"w": np.zeros((4, 6))},
           "opt_state": ({"w": np.zeros((4, 6))},)}
  plain = mesh_lib.train_state_shardings(state, mesh, shard_optimizer=False)
  split = mesh_lib.train_state_shardings(state, mesh, shard_optimizer=True)
  replicated = mesh_lib.replicated(mesh)
  assert plain["params"]["w"] == plain["opt_state"][0]["w"] == replicated
  assert split["params"]["w"] == split["step"] == replicated
  # One device in this process: split_axis keeps everything whole.
  assert split["opt_state"][0]["w"].is_fully_replicated
