"""The one training loop through the main job: a run resumed from a checkpoint
ends bit-identical to an uninterrupted one, and a non-finite loss stops it
keeping the last good checkpoint."""

import json
import os
import shutil

import numpy as np
import pytest

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
  bad_step = int(err.value.args[0].split(" at step ")[1].split(";")[0])
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert saved and max(saved) < bad_step
  assert "last good checkpoint (step %d)" % max(saved) in err.value.args[0]
