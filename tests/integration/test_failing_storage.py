"""Issue 15 section 4 through the trainer: a damaged newest checkpoint is reported and
the run resumes from the one before (ending exactly as an uninterrupted run); a
class-folder dataset that gained a class since its checkpoints is refused on resume in
one line naming the head's shapes, not with orbax's shape error.

The failure injections of single saves are in tests/checkpoints/test_train_state.py
(checkpoints) and tests/export/test_task_export.py (exports)."""

import os
import shutil

import numpy as np
import pytest

import data_fixtures
from run_fixtures import saved_steps
from run_fixtures import tiny_config
from run_fixtures import trained_params
from vpt_jax.checkpoints import train_state
from vpt_jax.training import trainer

# backbone and data_dir: fixtures of conftest.py.


def test_a_run_resumes_past_a_damaged_newest_checkpoint(backbone, data_dir, tmp_path, capfd):
  config = tiny_config(backbone, data_dir)  # 9 steps, a checkpoint every 3
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  _, uninterrupted = trained_params(workdir)
  assert saved_steps(workdir)[-2:] == [6, 9]
  # A disk that filled up while step 9 was copied: its array files are cut short.
  step_9 = os.path.join(workdir, "checkpoints", "9")
  for root, _, names in os.walk(os.path.join(step_9, "default")):
    for name in names:
      if os.path.basename(root) == "d":
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(1)
  shutil.rmtree(os.path.join(workdir, "export"))
  capfd.readouterr()
  trainer.train_and_evaluate(config, workdir)
  err = capfd.readouterr().err
  warning, = [line for line in err.splitlines() if line.startswith("warning: checkpoint")]
  assert "step 9 (" in warning and "resuming from step 6" in warning, warning
  assert os.path.isdir(step_9 + train_state.UNREADABLE_SUFFIX)
  assert 9 in saved_steps(workdir)  # saved again by the resumed run
  _, resumed = trained_params(workdir)
  for path in uninterrupted:  # steps 7-9 retrained from step 6: the same parameters
    np.testing.assert_array_equal(resumed[path], uninterrupted[path], err_msg=path)


def _class_folder(root, classes):
  for index, name in enumerate(classes):
    for i in range(4):
      data_fixtures.write_image(os.path.join(root, name, f"{i}.png"), 40 * index + 10 * i,
                                size=(8, 8))
  return str(root)


def test_a_dataset_that_gained_a_class_is_refused_on_resume_naming_the_head(
    backbone, tmp_path):
  folder = _class_folder(tmp_path / "images", ["cat", "dog"])
  config = tiny_config(backbone, "", **{
      "data.builder": "", "data.task": "folder", "data.path": folder, "data.label_key": "label",
      "data.train_split": "all", "data.eval_split": "", "data.test_split": "",
      "optim.epochs": 1, "optim.warmup_epochs": 0, "optim.batch_size": 4})
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  _class_folder(tmp_path / "images", ["cat", "dog", "emu"])
  with pytest.raises(train_state.TrainStateError,
                     match=r"checkpoint step 2 in .* does not fit the model: "
                           r"trainable/head/bias is \(2,\) there but \(3,\) in the model "
                           r".*new --workdir") as error:
    trainer.train_and_evaluate(config, workdir)
  assert "\n" not in str(error.value)
