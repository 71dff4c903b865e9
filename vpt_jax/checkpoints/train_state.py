"""Resumable training checkpoints with orbax.

Only what cannot be rebuilt is saved: the step, the trainable parameters,
the optimizer state and, for models with BatchNorm, its running averages.
Frozen parameters come back from the backbone file (or the seeded
initialisation), which keeps prompt-tuning checkpoints tiny.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import jax
import orbax.checkpoint as ocp

from vpt_jax.params import freezing
from vpt_jax.params import trees


# Crash-test hook, read only by tests/test_preemption.py; never set it elsewhere.
# "step:N": SIGKILL while step N computes (after the earlier saves completed);
# "save:N": SIGKILL inside the save of step N, after orbax wrote its temporary
# directory and before the commit (rename); "pause:N": after step N, create
# WORKDIR/test-paused-at-N.<process index> and wait until it is deleted, so a
# test can signal the process at a known step. open_manager acts on "save",
# training/loop.py on "step" and "pause".
TEST_HOOK_ENV = "VPT_JAX_TEST_KILL_AT"
TEST_HOOK_KINDS = ("step", "save", "pause")


def hook_step(kind: str) -> Optional[int]:
  """The step at which the crash-test hook ``kind`` fires, or None (the normal case)."""
  value = os.environ.get(TEST_HOOK_ENV, "")
  if not value:
    return None
  name, _, step = value.partition(":")
  if name not in TEST_HOOK_KINDS or not step.isdigit():
    raise ValueError(f"{TEST_HOOK_ENV}={value!r}: expected step:N, save:N or pause:N "
                     "(a test hook; unset it for real runs)")
  return int(step) if name == kind else None


def _killed_before_commit(kill_step: int):
  """orbax's atomic-rename temporary path, dying just before committing ``kill_step``."""

  class KilledBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):

    async def finalize(self, *args, **kwargs):
      if self.get_final().name == str(kill_step):  # the step directory, not an item
        os.kill(os.getpid(), signal.SIGKILL)
      return await super().finalize(*args, **kwargs)

  return KilledBeforeCommit


def open_manager(directory: str, *, keep: int, every_steps: int) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last ``keep`` >= 1 saves, one every ``every_steps``.

  orbax deletes the oldest saves beyond ``keep``, never the newest; the
  training loop saves only finite states, so the newest finite checkpoint
  always survives (``config_checks`` refuses keep < 1: max_to_keep=0 deletes
  every save).

  Saves are atomic (written to ``<step>.orbax-checkpoint-tmp``, then renamed):
  a process killed mid-save leaves only a temporary directory, which restores
  ignore and opening the manager deletes.
  """
  kill_step = hook_step("save")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=max(1, every_steps), create=True,
      cleanup_tmp_directories=True,
      temporary_path_class=None if kill_step is None else _killed_before_commit(kill_step))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _payload(state, labels) -> dict:
  trainable, _ = freezing.split(state["params"], labels)
  payload = {"step": state["step"], "trainable": trees.unflatten(trainable),
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
  _, frozen = freezing.split(state["params"], labels)
  return {"step": restored["step"],
          "params": freezing.merge(trees.flatten(restored["trainable"]), frozen),
          "opt_state": restored["opt_state"],
          **({"batch_stats": restored["batch_stats"]} if "batch_stats" in restored else {})}
