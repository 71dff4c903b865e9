"""Runs the sweep tests' fused tiny tuning grid on four devices with the optimizer
state split over them (``optim.shard_state``); prints JSON.

Started by training/test_sweeps.py in a subprocess, because the emulated device
count (XLA_FLAGS=--xla_force_host_platform_device_count=4) must be set before
JAX starts. Usage: sweep_multidevice_check.py BACKBONE DATA_DIR WORKDIR LR...
"""

import json
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]

import jax  # pylint: disable=g-import-not-at-top

import protocol_fixtures  # pylint: disable=g-import-not-at-top
from vpt_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top


def split_leaves_of_stacked_states() -> list:
  """Watches the fused program's stacked state: for each stacking, how many
  optimizer-state leaves are split over the devices (the call itself is unchanged)."""
  counts, shardings_of_state = [], mesh_lib.train_state_shardings

  def watched(state, mesh, *, shard_optimizer):
    shardings = shardings_of_state(state, mesh, shard_optimizer=shard_optimizer)
    counts.append(sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings["opt_state"])))
    return shardings
  mesh_lib.train_state_shardings = watched
  return counts


def main():
  backbone, data_dir, workdir, *lrs = sys.argv[1:]
  split_counts = split_leaves_of_stacked_states()
  out = protocol_fixtures.run_tiny_protocol(
      backbone, data_dir, workdir, 8, tuple(float(lr) for lr in lrs),
      **{"optim.shard_state": True})
  print(json.dumps({
      "devices": jax.device_count(), "split_leaves": split_counts, "best": out["summary"]["best"],
      "records": [[lr, wd, run_dir, record] for (lr, wd), (run_dir, record)
                  in out["records"].items()]}))


if __name__ == "__main__":
  main()
