"""One run per workdir: a lock file naming the run that holds it.

Two runs writing one workdir would interleave checkpoints and results, so the
second is refused with the first's host and pid. A lock left by a run that was
killed (its process no longer exists on this host, or its pid now belongs to
another process) is recognised and taken over, so rerunning after a crash or
SIGKILL just works. Only process 0 of a multi-host run takes the lock (the
others share its workdir by design). Workdirs on remote file systems
(``gs://...``) are not locked: their object stores have no atomic create here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Iterator, Optional

from vpt_jax import errors

LOCK_FILE = ".vpt_jax.lock"


class WorkdirBusyError(errors.UserError):
  """Another live run holds the workdir."""


def _process_start(pid: int) -> Optional[str]:
  """The start time of a live process (clock ticks since boot), None if there is none.

  Read from /proc where there is one, so a pid reused by a later process does
  not pass for the original; elsewhere only existence is checked ("unknown").
  """
  if os.path.exists("/proc/self/stat"):
    try:
      with open(f"/proc/{pid}/stat") as f:
        # Field 22 (starttime), the 20th after the parenthesised command name.
        return f.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
      return None
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return None
  except PermissionError:
    pass  # alive, owned by another user
  return "unknown"


def _owner() -> dict:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}


def holder_is_alive(holder: dict) -> bool:
  """Whether the process a lock names still runs (on another host: assumed so)."""
  if holder.get("host") != socket.gethostname():
    return True
  start = _process_start(int(holder.get("pid", -1)))
  if start is None:
    return False
  return start == "unknown" or holder.get("start") in (None, "unknown", start)


def _read(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # half-written by a run killed mid-write: nobody holds it


def _create(path: str) -> bool:
  """Writes the lock if no file is there (atomically); False if one is."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(_owner(), f)
  return True


def acquire(workdir: str) -> Optional[str]:
  """Takes ``workdir``'s lock (or a dead run's); returns its path (None: not locked).

  Raises:
    WorkdirBusyError: a live run holds it (host and pid named).
  """
  if "://" in workdir:
    return None
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  for _ in range(3):  # a dead holder's file is removed and the create retried
    if _create(path):
      return path
    holder = _read(path)
    if holder is None:
      continue  # released between the two calls
    if holder and holder_is_alive(holder):
      raise WorkdirBusyError(
          f"workdir {workdir} is in use by another run (host {holder.get('host')}, pid "
          f"{holder.get('pid')}); wait for it to finish, use another --workdir, or delete "
          f"{path} if that run is gone")
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  raise WorkdirBusyError(f"could not take the lock {path}: other runs keep creating it; "
                         "start one run per workdir")


def release(path: Optional[str]) -> None:
  """Removes a lock this process holds (a no-op for None or another's lock)."""
  if path and (_read(path) or {}).get("pid") == os.getpid():
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


@contextlib.contextmanager
def locked(workdir: str, is_leader: bool = True) -> Iterator[Optional[str]]:
  """Holds the workdir's lock for the duration (process 0 only: ``is_leader``)."""
  path = acquire(workdir) if is_leader else None
  try:
    yield path
  finally:
    release(path)
