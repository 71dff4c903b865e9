"""training/head_init: ``head.init=file`` starts the linear head from a
(num_classes, D) .npy of class embeddings, checked before any compute."""

from __future__ import annotations

import numpy as np
import pytest

import run_fixtures
from vpt_jax import errors
from vpt_jax.training import config_checks
from vpt_jax.training import head_init
from vpt_jax.training import setup
from vpt_jax.training import text_heads
from vpt_jax.training import trainer

TEST_WIDTH = 16  # the hidden width of variant test/4 (models/backbones.py)


def _classes(backbone, data_dir) -> int:
  return setup.inputs.load_train_data(run_fixtures.tiny_config(backbone, data_dir)).num_classes


def _embeddings(path, shape, seed=0):
  rows = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  np.save(path, rows)
  return rows.astype(np.float64)


@pytest.mark.parametrize("normalize, scale", [(True, 0.0), (False, 2.5)])
def test_the_head_starts_from_the_file(backbone, data_dir, tmp_path, normalize, scale):
  classes = _classes(backbone, data_dir)
  rows = _embeddings(tmp_path / "classes.npy", (classes, TEST_WIDTH))
  config = run_fixtures.tiny_config(backbone, data_dir, **{
      "method": "linear", "head.init": "file", "head.file": str(tmp_path / "classes.npy"),
      "head.normalize": normalize, "head.scale": scale})
  run = setup.setup_run(config, str(tmp_path / "run"))
  try:
    head = run.state["params"]["head"]
    # Independent expectation: rows / |rows| (or the rows) times the scale (0 -> 1).
    expected = rows / np.sqrt((rows ** 2).sum(1, keepdims=True)) if normalize else rows
    expected = expected * (scale or 1.0)
    np.testing.assert_allclose(np.asarray(head["kernel"]), expected.T, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(head["bias"]), np.zeros(classes))
  finally:
    setup.close(run)


def test_a_misshapen_file_is_refused_naming_the_file_and_the_shape(backbone, data_dir,
                                                                   tmp_path):
  classes = _classes(backbone, data_dir)
  path = str(tmp_path / "bad.npy")
  _embeddings(path, (classes, TEST_WIDTH + 1))
  config = run_fixtures.tiny_config(backbone, data_dir, **{
      "method": "linear", "head.init": "file", "head.file": path})
  with pytest.raises(errors.UserError, match=rf"bad\.npy.*\({classes}, {TEST_WIDTH}\)") as e:
    setup.setup_run(config, str(tmp_path / "run"))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("array, message", [
    (np.zeros((3, 3)), r"shape \(3, 3\).*\(2, 3\)"),
    (np.zeros(3), r"shape \(3,\)"),
    (np.zeros((2, 3), np.int64), "int64 values"),
    (np.array([[1.0, np.nan, 0.0], [0.0, 1.0, 0.0]]), "NaN or infinite"),
])
def test_files_that_cannot_be_the_head_are_refused(tmp_path, array, message):
  path = str(tmp_path / "rows.npy")
  np.save(path, array)
  with pytest.raises(errors.UserError, match=message):
    head_init.read_embedding_file(path, 2, 3)


def test_a_file_that_is_not_npy_is_refused(tmp_path):
  path = tmp_path / "rows.npy"
  path.write_text("not an array")
  with pytest.raises(errors.UserError, match="not a readable .npy"):
    head_init.read_embedding_file(str(path), 2, 3)


@pytest.mark.parametrize("overrides, message", [
    ({"head.init": "clip"}, "Unknown head.init"),
    ({"head.init": "file"}, "needs --config.head.file"),
    ({"head.init": "file", "head.file": "/no/such.npy"}, "does not exist"),
    ({"head.init": "file", "head.file": "x.npy", "method": "mlp-2"}, "hidden head layers"),
    ({"head.init": "file", "head.file": "x.npy", "head.scale": -1.0}, "head.scale"),
])
def test_bad_head_settings_are_refused_before_any_data(backbone, overrides, message):
  config = run_fixtures.tiny_config(backbone, "/nonexistent-data", **overrides)
  with pytest.raises(errors.UserError, match=message):
    config_checks.validate_config(config)


def test_all_zero_rows_cannot_be_normalised():
  with pytest.raises(errors.UserError, match="all zeros"):
    text_heads.l2_normalise(np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_evaluate_without_training_scores_the_file_head(backbone, data_dir, tmp_path):
  """--mode evaluate with head.init and no checkpoint: the zero-shot scores and export."""
  classes = _classes(backbone, data_dir)
  rows = _embeddings(tmp_path / "classes.npy", (classes, TEST_WIDTH), seed=4)
  config = run_fixtures.tiny_config(backbone, data_dir, **{
      "method": "linear", "head.init": "file", "head.file": str(tmp_path / "classes.npy"),
      "head.normalize": False, "data.fingerprint": False})
  workdir = str(tmp_path / "run")
  outcome = trainer.from_checkpoint(config, workdir, "evaluate")
  results, flat = run_fixtures.trained_params(workdir)
  assert outcome["test"]["count"] == results["test"]["count"] == 10
  np.testing.assert_allclose(flat["head/kernel"], rows.T, rtol=1e-6, atol=1e-7)
  assert run_fixtures.saved_steps(workdir) == []  # nothing was trained or saved
