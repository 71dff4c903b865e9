"""Resumable training checkpoints with orbax.

Only what cannot be rebuilt is saved: the step, the trainable parameters,
the optimizer state and, for models with BatchNorm, its running averages.
Frozen parameters come back from the backbone file (or the seeded
initialisation), which keeps prompt-tuning checkpoints tiny.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from vpt_jax.training import partition


def open_manager(directory: str, *, keep: int, every_steps: int) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last ``keep`` saves, one every ``every_steps``."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=max(1, every_steps), create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _payload(state, labels) -> dict:
  trainable, _ = partition.split(state["params"], labels)
  payload = {"step": state["step"], "trainable": partition.unflatten(trainable),
             "opt_state": state["opt_state"]}
  if "batch_stats" in state:  # BatchNorm running averages (MLP-k heads)
    payload["batch_stats"] = state["batch_stats"]
  return payload


def save_due(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether the interval or a (multi-host synchronised) preemption asks for a save."""
  return manager.should_save(step) or manager.reached_preemption(step)


def save(manager: ocp.CheckpointManager, state, labels) -> bool:
  """Saves ``state`` now (asynchronously); False if this step is already saved."""
  step = int(jax.device_get(state["step"]))
  if step in manager.all_steps():
    return False
  return manager.save(step, args=ocp.args.StandardSave(_payload(state, labels)), force=True)


def restore_latest(manager: ocp.CheckpointManager, state, labels):
  """Returns ``state`` with the latest checkpoint's values, or None if there is none.

  ``state`` supplies the frozen parameters and the target shapes and
  shardings; restored arrays land with the shardings of ``state``.
  """
  step = manager.latest_step()
  if step is None:
    return None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _payload(state, labels))
  restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  _, frozen = partition.split(state["params"], labels)
  return {"step": restored["step"],
          "params": partition.merge(partition.flatten(restored["trainable"]), frozen),
          "opt_state": restored["opt_state"],
          **({"batch_stats": restored["batch_stats"]} if "batch_stats" in restored else {})}
