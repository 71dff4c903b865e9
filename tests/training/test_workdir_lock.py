"""One run per workdir: a live holder refuses the second run, a dead one's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from vpt_jax import errors
from vpt_jax.training import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD = ("import sys, time; from vpt_jax.training import workdir_lock; "
        "workdir_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)")


def _lock_file(workdir):
  return os.path.join(workdir, workdir_lock.LOCK_FILE)


def _write_holder(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(_lock_file(workdir), "w") as f:
    json.dump(holder, f)


def test_a_second_run_is_refused_naming_the_first_and_a_killed_ones_lock_is_taken(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", HOLD, workdir], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=rf"host {socket.gethostname()}, pid {holder.pid}\)"):
      workdir_lock.acquire(workdir)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  path = workdir_lock.acquire(workdir)  # the killed run's lock is stale
  with open(path) as f:
    assert json.load(f)["pid"] == os.getpid()
  workdir_lock.release(path)
  assert not os.path.exists(path)


def test_a_reused_pid_does_not_pass_for_the_run_that_wrote_the_lock(tmp_path):
  workdir = str(tmp_path / "run")
  # This process is alive, but it started at another time than the lock says.
  _write_holder(workdir, host=socket.gethostname(), pid=os.getpid(), start="1")
  with workdir_lock.locked(workdir) as path:
    with open(path) as f:
      assert json.load(f)["start"] != "1"
  assert not os.path.exists(path)


def test_a_lock_from_another_host_is_respected(tmp_path):
  workdir = str(tmp_path / "run")
  _write_holder(workdir, host="another-host", pid=1, start="5")
  with pytest.raises(errors.UserError, match="host another-host, pid 1.*delete .*lock"):
    workdir_lock.acquire(workdir)


def test_a_half_written_lock_is_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(_lock_file(workdir), "w") as f:
    f.write('{"host": "')  # killed mid-write
  assert workdir_lock.acquire(workdir) == _lock_file(workdir)


def test_only_the_leader_locks_and_remote_workdirs_are_not_locked(tmp_path):
  with workdir_lock.locked(str(tmp_path / "run"), is_leader=False) as path:
    assert path is None and not os.path.exists(_lock_file(str(tmp_path / "run")))
  assert workdir_lock.acquire("gs://bucket/run") is None


def test_release_leaves_another_runs_lock(tmp_path):
  workdir = str(tmp_path / "run")
  _write_holder(workdir, host="another-host", pid=1, start="5")
  workdir_lock.release(_lock_file(workdir))
  assert os.path.exists(_lock_file(workdir))


def test_training_on_a_held_workdir_is_refused_before_any_compute(backbone, data_dir, tmp_path,
                                                                  monkeypatch):
  from run_fixtures import tiny_config  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import inputs  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import trainer  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", HOLD, workdir], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  loaded = []
  monkeypatch.setattr(inputs, "load_train_data", lambda *a, **k: loaded.append(1))
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {holder.pid}"):
      trainer.train_and_evaluate(tiny_config(backbone, data_dir), workdir)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert not loaded  # refused before the data was read
