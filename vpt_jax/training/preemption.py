"""Stopping at a step boundary: the preemption notice, its exit status, crash-test hooks.

A preempted run saves the step it reached and exits with ``PREEMPTED_EXIT_CODE``;
rerunning the same command resumes from that checkpoint. The crash-test hooks
(``checkpoints.train_state.TEST_HOOK_ENV``, read only by tests/test_preemption.py)
stop the process at points no outside observer can hit reliably.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax

# Exit status of a run stopped by a preemption notice after saving (EX_TEMPFAIL:
# "try again"): schedulers can tell it from success and from failure.
PREEMPTED_EXIT_CODE = 75


class Preempted(SystemExit):
  """Training stopped at a step boundary after a preemption notice and a save."""

  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step


class PreemptionNotice:
  """Turns SIGTERM (the TPU/VM preemption notice) into a flag read at step boundaries.

  Single process only. On multi-host runs ``jax.distributed.initialize`` has
  installed JAX's preemption service, which owns SIGTERM: a notice on any host
  makes orbax's ``reached_preemption`` (JAX's preemption sync point) true on
  every host at the same step. A Python handler would replace it, and the host
  that got the signal would stop alone while the others wait in a collective,
  so none is installed there. Restores the previous handler on exit.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False



def kill_inside_step(managers) -> None:
  """Crash-test hook: SIGKILL while a step computes, once earlier saves are complete.

  ``managers``: the checkpoint managers of the runs the step trains.
  """
  for manager in managers:
    manager.wait_until_finished()  # makes the last complete checkpoint known
  os.kill(os.getpid(), signal.SIGKILL)


def pause_for_test(workdir: str, step: int) -> None:
  """Crash-test hook: waits at a step boundary while a test signals the process.

  Creates ``WORKDIR/test-paused-at-<step>.<process index>`` and returns when
  the test deletes it (or after 5 minutes).
  """
  marker = os.path.join(workdir, f"test-paused-at-{step}.{jax.process_index()}")
  with open(marker, "w") as f:
    f.write(str(os.getpid()))
  deadline = time.monotonic() + 300
  while os.path.exists(marker) and time.monotonic() < deadline:
    time.sleep(0.05)

