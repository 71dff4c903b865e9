"""The one training loop through the main job: a run resumed from a checkpoint
ends bit-identical to an uninterrupted one, and a non-finite loss or state stops
it keeping only finite checkpoints (the newest finite one among them)."""

import json
import os
import shutil

import numpy as np
import pytest

from run_fixtures import checkpoint_is_finite
from run_fixtures import error_step
from run_fixtures import OVERFLOWS_AT_STEP_4
from run_fixtures import saved_steps
from run_fixtures import tiny_config
from run_fixtures import trained_params
from vpt_jax.training import trainer

# backbone and data_dir: fixtures of conftest.py.


def test_resume_after_restart_is_bit_identical(backbone, data_dir, tmp_path):
  config = tiny_config(backbone, data_dir)
  uninterrupted = str(tmp_path / "uninterrupted")
  trainer.train_and_evaluate(config, uninterrupted)
  _, expected = trained_params(uninterrupted)

  # A run that "died" after its step-3 checkpoint: later checkpoints and
  # results are gone; rerunning the same command resumes at step 3.
  interrupted = str(tmp_path / "interrupted")
  trainer.train_and_evaluate(config, interrupted)
  for name in os.listdir(os.path.join(interrupted, "checkpoints")):
    if name.isdigit() and int(name) > 3:
      shutil.rmtree(os.path.join(interrupted, "checkpoints", name))
  shutil.rmtree(os.path.join(interrupted, "export"))
  os.remove(os.path.join(interrupted, "results.json"))
  trainer.train_and_evaluate(config, interrupted)
  with open(os.path.join(interrupted, "metrics.jsonl")) as f:
    steps_logged = [json.loads(line)["step"] for line in f if "train/loss" in line]
  assert steps_logged.count(6) == 2 and steps_logged.count(3) == 1  # resumed after step 3
  _, resumed = trained_params(interrupted)
  assert sorted(resumed) == sorted(expected)
  for path in expected:
    np.testing.assert_array_equal(resumed[path], expected[path], err_msg=path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(backbone, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(backbone, data_dir, **{
      "optim.warmup_epochs": 0, "optim.base_lr": 1e30, "log_every_steps": 100,
      "checkpoint.every_steps": 1})
  with pytest.raises(FloatingPointError, match=r"loss became (nan|inf) at step (\d+)") as err:
    trainer.train_and_evaluate(config, workdir)
  saved = saved_steps(workdir)
  assert saved and max(saved) < error_step(err.value)
  assert "last finite checkpoint (step %d)" % max(saved) in str(err.value)


def test_weights_non_finite_under_a_finite_loss_save_nothing(backbone, data_dir, tmp_path):
  """lr 1e45 * 8 / 256 overflows float32: step 1's loss comes from the finite
  initial weights (finite), its update makes them infinite. Nothing is saved."""
  workdir = str(tmp_path / "run")
  config = tiny_config(backbone, data_dir, **{
      "optim.warmup_epochs": 0, "optim.base_lr": 1e45, "checkpoint.every_steps": 1})
  with pytest.raises(FloatingPointError) as err:
    trainer.train_and_evaluate(config, workdir)
  assert str(err.value).startswith(
      "parameters or optimizer state became non-finite (the loss was still ")
  assert error_step(err.value) == 1
  assert "No finite checkpoint exists (none was saved before step 1); start over" in str(
      err.value)
  assert saved_steps(workdir) == []


def test_keep_never_trades_the_newest_finite_checkpoint_for_a_diverged_one(
    backbone, data_dir, tmp_path):
  """Step 4's update overflows under a finite loss (``OVERFLOWS_AT_STEP_4``).
  With a save every step and keep=2 the kept checkpoints are steps 2 and 3, and
  a rerun resumes from step 3."""
  workdir = str(tmp_path / "run")
  config = tiny_config(backbone, data_dir, **{
      **OVERFLOWS_AT_STEP_4, "log_every_steps": 1,
      "checkpoint.every_steps": 1, "checkpoint.keep": 2})
  for attempt in range(2):  # the run, then the same command again
    with pytest.raises(FloatingPointError) as err:
      trainer.train_and_evaluate(config, workdir)
    assert str(err.value).startswith("parameters or optimizer state became non-finite")
    assert error_step(err.value) == 4, attempt
    assert (f"The last finite checkpoint (step 3) is kept in {workdir}/checkpoints; "
            "rerunning this command resumes from it." in str(err.value))
    assert saved_steps(workdir) == [2, 3]
    assert all(checkpoint_is_finite(workdir, step) for step in (2, 3))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps_logged = [json.loads(line)["step"] for line in f if "train/loss" in line]
  # The rerun resumed at step 3: it logged nothing again before stopping at step 4.
  assert steps_logged == [1, 2, 3]


def test_the_schedule_a_real_run_logs_is_the_hand_computed_one(backbone, data_dir, tmp_path):
  # 24 training images in batches of 6: 4 steps an epoch, 3 epochs, 12 steps. The peak
  # is base_lr * batch / 256 = 2.0 * 6 / 256. Step s trains with the optimizer's count
  # s - 1, at the integer epoch floor((s - 1) / 4): epoch 0 is the warmup epoch (lr 0),
  # epoch 1 the start of the cosine (the peak), epoch 2 its middle (half the peak).
  config = tiny_config(backbone, data_dir, **{
      "optim.batch_size": 6, "log_every_steps": 1, "data.eval_split": "", "eval.batch_size": 5})
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    logged = {row["step"]: row["train/learning_rate"] for row in map(json.loads, f)
              if "train/learning_rate" in row}
  peak = 2.0 * 6 / 256
  expected = [0.0] * 4 + [peak] * 4 + [peak / 2] * 4
  assert sorted(logged) == list(range(1, 13))
  np.testing.assert_allclose([logged[step] for step in range(1, 13)], expected, rtol=1e-6)
