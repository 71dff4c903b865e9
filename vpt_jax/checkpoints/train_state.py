"""Resumable training checkpoints with orbax.

Only what cannot be rebuilt is saved: the step, the trainable parameters,
the optimizer state and, for models with BatchNorm, its running averages.
Frozen parameters come back from the backbone file (or the seeded
initialisation), which keeps prompt-tuning checkpoints tiny.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Callable, Optional

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from vpt_jax.checkpoints import npz
from vpt_jax.params import freezing
from vpt_jax.params import trees

# Where an unreadable checkpoint is moved (``<step>.unreadable``): out of orbax's
# step namespace, so later saves of that step and ``latest_step`` ignore it.
UNREADABLE_SUFFIX = ".unreadable"


class TrainStateError(npz.CheckpointError):
  """A training checkpoint that cannot be written, read or fitted to the model."""


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
  # The handler is named so that ``item_metadata`` can read a step's shapes.
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


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
  """Saves ``state`` now (asynchronously); False if this step is already saved.

  Raises:
    TrainStateError: the disk refused the write (full, read-only, gone); orbax
      writes to a temporary name, so the previous checkpoints stay intact.
  """
  step = int(jax.device_get(state["step"]))
  if step in manager.all_steps():
    return False
  with _disk_errors(manager, f"checkpoint step {step}"):
    return manager.save(step, args=ocp.args.StandardSave(_payload(state, labels)), force=True)


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
  """Waits for the pending asynchronous save; a disk error becomes ``TrainStateError``."""
  with _disk_errors(manager, "the pending checkpoint"):
    manager.wait_until_finished()


@contextlib.contextmanager
def _disk_errors(manager: ocp.CheckpointManager, what: str):
  """Turns an OSError of a save (disk full, read-only, gone) into one line with the fix."""
  try:
    yield
  except OSError as error:
    manager.reload()  # the committed steps, as on disk
    kept = manager.latest_step()
    intact = (f"the previous checkpoint (step {kept}) is intact; free space or fix the disk "
              "and rerun the command to resume from it" if kept is not None else
              "no earlier checkpoint exists; free space or fix the disk and rerun")
    raise TrainStateError(f"could not save {what} in {manager.directory}: "
                          f"{_first_line(error)}; {intact}") from error


def restore_latest(manager: ocp.CheckpointManager, state, labels,
                   warn: Optional[Callable[[str], None]] = None):
  """Returns ``state`` with the latest readable checkpoint's values, or None if there is none.

  ``state`` supplies the frozen parameters and the target shapes and
  shardings; restored arrays land with the shardings of ``state``. A step
  whose files are truncated or garbled is moved to ``<step>.unreadable``
  with a one-line ``warn`` (default: stderr) naming it and the step resumed
  from instead.

  Raises:
    TrainStateError: a readable checkpoint whose shapes do not fit the model
      (e.g. the dataset gained a class since), or no readable checkpoint at all.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _payload(state, labels))
  unreadable = {}
  for step in steps:
    try:
      saved = manager.item_metadata(step)
      if saved is None:
        raise ValueError("its metadata is missing")
      check_fits(saved, target, step, manager.directory)
      restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except TrainStateError:
      raise
    except (ValueError, OSError) as error:  # orbax/tensorstore: truncated or garbled files
      unreadable[step] = error
      continue
    if unreadable:
      _set_aside(manager, unreadable, step, warn or _print_warning)
    _, frozen = freezing.split(state["params"], labels)
    return {"step": restored["step"],
            "params": freezing.merge(trees.flatten(restored["trainable"]), frozen),
            "opt_state": restored["opt_state"],
            **({"batch_stats": restored["batch_stats"]} if "batch_stats" in restored else {})}
  raise TrainStateError(
      f"no checkpoint in {manager.directory} can be read ({_listing(unreadable)}); move the "
      "folder away to start over, or use a new --workdir")


def check_fits(saved, target, step: int, directory) -> None:
  """Refuses a checkpoint whose arrays do not have the model's shapes, naming the first."""
  saved_shapes = {_key(path): tuple(leaf.shape)
                  for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  wanted = {_key(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
  if saved_shapes == wanted:
    return
  differ = [k for k in sorted(wanted) if k in saved_shapes and saved_shapes[k] != wanted[k]]
  if differ:
    # A trainable head leaf first: its shape shows a changed class count.
    key = min(differ, key=lambda k: ("head" not in k, not k.startswith("trainable/"), k))
    problem = f"{key} is {saved_shapes[key]} there but {wanted[key]} in the model"
  else:
    extra = sorted(set(saved_shapes) - set(wanted))
    missing = sorted(set(wanted) - set(saved_shapes))
    problem = (f"it lacks {missing[:3]}" if missing else "") + (
        f"{' and ' if missing else ''}it holds {extra[:3]} the model lacks" if extra else "")
  raise TrainStateError(
      f"checkpoint step {step} in {directory} does not fit the model: {problem} (the data's "
      "class count or the model changed since it was saved); resume with the data and config "
      "it was trained with, or start over with a new --workdir")


def _key(path) -> str:
  """A tree path as "a/b/0/c", whether its nodes are dicts, tuples or named tuples."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def _set_aside(manager: ocp.CheckpointManager, unreadable: dict, step: int, warn) -> None:
  """Moves the unreadable steps out of orbax's view (process 0) and says so."""
  directory = str(manager.directory)
  if "://" in directory:  # gs:// and other object stores cannot rename a folder
    raise TrainStateError(
        f"checkpoint {_listing(unreadable)} in {directory} cannot be read; delete it "
        f"(gsutil -m rm -r) and rerun to resume from step {step}")
  if jax.process_index() == 0:
    for bad in unreadable:
      os.rename(os.path.join(directory, str(bad)),
                os.path.join(directory, f"{bad}{UNREADABLE_SUFFIX}"))
  multihost_utils.sync_global_devices("vpt_jax: unreadable checkpoints set aside")
  manager.reload()
  warn(f"warning: checkpoint {_listing(unreadable)} in {directory} cannot be read; moved to "
       f"<step>{UNREADABLE_SUFFIX}, resuming from step {step}")


def _listing(unreadable: dict) -> str:
  return ", ".join(f"step {step} ({_first_line(error)})" for step, error in unreadable.items())


def _first_line(error: BaseException, limit: int = 160) -> str:
  """An exception's first line, cut to ``limit`` characters (tensorstore's run to pages)."""
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line if len(line) <= limit else line[:limit] + "..."


def _print_warning(message: str) -> None:
  print(message, file=sys.stderr, flush=True)
