"""Crashes and preemptions of real `run.py` processes (tiny ViT, 16 px, vpt_sprites/tiny).

A run SIGKILLed inside a step, SIGKILLed in the middle of a checkpoint save and
stopped by SIGTERM, each time rerun with the same command, ends with exactly
the parameters of a run that was never interrupted. On two processes, SIGTERM
to one of them makes both save the same step (JAX's preemption sync point).

The kill points come from the documented crash-test hook
``VPT_JAX_TEST_KILL_AT`` (vpt_jax/checkpoints/train_state.py): ``step:N`` and
``save:N`` make the process SIGKILL itself at a point no outside observer can
hit reliably (while step N computes; after orbax wrote step N's temporary
directory but before it commits it); ``pause:N`` holds the process at the end
of step N until the test, having sent a real SIGTERM from outside, lets it go.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tolerances
import checkpoint_fixtures
import run_fixtures
from vpt_jax.checkpoints import train_state
from vpt_jax.data import local_builders  # pylint: disable=unused-import
from vpt_jax.export import task_export
from vpt_jax.training import config_checks
from vpt_jax.training import preemption
from vpt_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 600  # seconds per process: the test machine may be heavily loaded
# After the signal a process only finishes a few steps and saves; hosts that
# disagree on the step would hang in a collective instead.
STOP_TIMEOUT = 240
# 24 training images, batch 8: 3 steps per epoch, 15 steps; a checkpoint every 2
# (orbax also saves the first step of a run that has none).
TOTAL_STEPS = 15
TMP_SUFFIX = ".orbax-checkpoint-tmp"


# The run every test repeats, as --config.<key>=<value> overrides of configs/vpt.py.
OVERRIDES = {
    "data.label_key": "shape", "data.train_split": "train", "data.eval_split": "",
    "data.test_split": "", "optim.batch_size": 8, "optim.epochs": 5,
    "optim.warmup_epochs": 0, "optim.base_lr": 0.5, "log_every_steps": 1,
    "checkpoint.every_steps": 2, "checkpoint.keep": 20}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The config argument (with a tiny backbone file) and a prepared data_dir."""
  root = tmp_path_factory.mktemp("preemption")
  backbone = checkpoint_fixtures.write_tiny_backbone(root / "backbone.npz", variant="test/4",
                                                     image_size=16)
  data_dir = str(root / "tfds")
  # Built once up front: concurrent processes must not prepare the same dataset.
  tfds.builder("vpt_sprites/tiny", data_dir=data_dir).download_and_prepare()
  arg = (f"method=vpt_deep,num_prompts=2,variant=test/4,image_size=16,"
         f"builder=vpt_sprites/tiny,checkpoint={backbone}")
  return arg, data_dir


@pytest.fixture(scope="module")
def command(files):
  """workdir -> the one `python run.py ...` command every (re)run of a test uses."""
  arg, data_dir = files
  flags = [f"--config=configs/vpt.py:{arg}", f"--config.data.data_dir={data_dir}"]
  flags += [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
  return lambda workdir: [sys.executable, "run.py", *flags, f"--workdir={workdir}"]


def _env(hook: str = "") -> dict:
  env = {k: v for k, v in os.environ.items() if k != train_state.TEST_HOOK_ENV}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  if hook:
    env[train_state.TEST_HOOK_ENV] = hook
  return env


def _run(cmd, hook: str = "") -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=REPO, env=_env(hook), capture_output=True, text=True,
                        timeout=TIMEOUT)


def _start(cmd, log_path, hook: str = "") -> subprocess.Popen:
  # A file, not a pipe: nobody reads the output while the process runs.
  with open(log_path, "w") as log:
    return subprocess.Popen(cmd, cwd=REPO, env=_env(hook), stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(path: str, processes) -> None:
  """Returns once ``path`` exists; fails if a process exits first or time runs out."""
  deadline = time.monotonic() + TIMEOUT
  while not os.path.exists(path):
    for process in processes:
      assert process.poll() is None, f"process exited with {process.returncode} early"
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.1)


def _finalized_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _temporary_dirs(workdir) -> list[str]:
  return sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if TMP_SUFFIX in n)


def _resumed_at(output: str) -> int:
  found = re.findall(r"resuming at step (\d+)", output)
  return int(found[0]) if found else 0


def _exported(workdir) -> dict:
  _, flat = task_export.read_export(os.path.join(workdir, "export"))
  return flat


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
  """The exported parameters of the run never interrupted (in this process: cheaper)."""
  arg, data_dir = files
  config = run_fixtures.run_py_config(f"configs/vpt.py:{arg}",
                                      {"data.data_dir": data_dir, **OVERRIDES})
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  results = trainer.train_and_evaluate(config, workdir)
  assert results["step"] == TOTAL_STEPS
  with open(os.path.join(workdir, config_checks.CONFIG_FILE)) as f:
    written = json.load(f)
  return written, _exported(workdir)


def _check_same_config(workdir, uninterrupted) -> None:
  """The subprocesses ran the config of the reference run."""
  with open(os.path.join(workdir, config_checks.CONFIG_FILE)) as f:
    assert json.load(f) == uninterrupted[0]


def test_sigkill_in_a_step_and_mid_save_then_sigterm_resume_bit_identically(
    command, uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  cmd = command(workdir)

  # 1. SIGKILL while step 5 computes: the checkpoints of steps 1, 2 and 4 survive.
  out = _run(cmd, hook="step:5")
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert _finalized_steps(workdir) == [1, 2, 4]
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  # 2. The same command resumes at step 4 and is SIGKILLed while saving step 8:
  # orbax's temporary directory of step 8 holds the arrays but was never committed.
  out = _run(cmd, hook="save:8")
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert _resumed_at(out.stdout) == 4
  assert _finalized_steps(workdir) == [1, 2, 4, 6]
  assert _temporary_dirs(workdir) == [f"8{TMP_SUFFIX}"]
  assert os.listdir(os.path.join(workdir, "checkpoints", f"8{TMP_SUFFIX}"))

  # 3. The same command ignores (and deletes) the incomplete step 8, resumes at 6;
  # SIGTERM from outside while it waits after step 10 makes it save step 11,
  # the next step boundary, and exit with the distinct status 75.
  process = _start(cmd, tmp_path / "sigterm.log", hook="pause:10")
  try:
    marker = os.path.join(workdir, "test-paused-at-10.0")
    _wait_for(marker, [process])
    process.send_signal(signal.SIGTERM)
    os.remove(marker)
    assert process.wait(timeout=STOP_TIMEOUT) == preemption.PREEMPTED_EXIT_CODE == 75
  finally:
    process.kill()
  log = (tmp_path / "sigterm.log").read_text()
  assert _resumed_at(log) == 6
  assert "preempted: saved step 11 in" in log
  assert _finalized_steps(workdir) == [1, 2, 4, 6, 8, 10, 11]
  assert _temporary_dirs(workdir) == []

  # 4. The same command resumes at 11 and finishes with the uninterrupted
  # run's parameters, bit for bit.
  out = _run(cmd)
  assert out.returncode == 0, out.stderr[-3000:]
  assert _resumed_at(out.stdout) == 11
  _check_same_config(workdir, uninterrupted)
  resumed, expected = _exported(workdir), uninterrupted[1]
  assert sorted(resumed) == sorted(expected)
  for path in expected:
    np.testing.assert_array_equal(resumed[path], expected[path], err_msg=path)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.numerics
@pytest.mark.multiprocess
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(
    command, uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  port = _free_port()
  processes = [
      _start(command(workdir) + ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                                 "--num_processes=2", f"--process_id={i}"],
             tmp_path / f"process{i}.log", hook="pause:5" if i == 0 else "")
      for i in range(2)]
  try:
    # Process 0 waits after step 5 (process 1 then blocks in step 6's gradient
    # all-reduce); only process 1 gets the notice. JAX's notifier polls for it
    # about once a second, so process 0 stays a little longer: then the hosts
    # agree on a step soon after 5.
    marker = os.path.join(workdir, "test-paused-at-5.0")
    _wait_for(marker, processes)
    processes[1].send_signal(signal.SIGTERM)
    time.sleep(3)
    os.remove(marker)
    codes = [p.wait(timeout=STOP_TIMEOUT) for p in processes]
  finally:
    for p in processes:
      p.kill()
  logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
  assert codes == [preemption.PREEMPTED_EXIT_CODE] * 2, [log[-3000:] for log in logs]
  saved = [re.findall(r"preempted: saved step (\d+)", log) for log in logs]
  # Both stopped at the same step (one past the latest step any host had
  # reached when the notice was shared), after the pause and before the end.
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  assert 5 < int(saved[0][0]) < TOTAL_STEPS, saved
  step = int(saved[0][0])
  assert step in _finalized_steps(workdir) and _temporary_dirs(workdir) == []

  # The checkpoint is complete: one process resumes from it and ends where the
  # uninterrupted single-process run ends (up to the order of the gradient sums).
  out = _run(command(workdir))
  assert out.returncode == 0, out.stderr[-3000:]
  assert _resumed_at(out.stdout) == step
  _check_same_config(workdir, uninterrupted)
  resumed, expected = _exported(workdir), uninterrupted[1]
  assert sorted(resumed) == sorted(expected)
  # Gradient sums over batch x tokens (8 x (1 + 2 + 16)), for 15 steps.
  atol = tolerances.rounding_atol(tolerances.largest_magnitude(expected),
                                  reduction_length=8 * 19, steps=TOTAL_STEPS)
  for path in expected:
    np.testing.assert_allclose(resumed[path], expected[path], rtol=0, atol=atol, err_msg=path)
