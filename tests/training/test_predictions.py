"""Saved predictions: the real rows of padded batches (with and without a settings
axis), and the file a tiny run writes with eval.save_predictions."""

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from run_fixtures import tiny_config
from vpt_jax.training import predictions
from vpt_jax.training import trainer

# backbone and data_dir: fixtures of conftest.py.


def test_keep_real_rows_drops_padding_and_keeps_the_settings_axis():
  logits = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # (S=2, B=3, C=2)
  chunks = [{"logits": logits, "label": np.array([[4, 5, 6], [4, 5, 6]]),
             "mask": np.array([[True, True, True]] * 2)},
            {"logits": logits + 100, "label": np.array([[7, 0, 0], [7, 0, 0]]),
             "mask": np.array([[True, False, False]] * 2)}]
  kept = predictions.keep_real_rows(chunks)
  assert kept["logits"].dtype == np.float16 and kept["labels"].dtype == np.int32
  assert kept["labels"].tolist() == [[4, 5, 6, 7], [4, 5, 6, 7]]
  np.testing.assert_array_equal(kept["logits"][1], [[6, 7], [8, 9], [10, 11], [106, 107]])
  single = predictions.keep_real_rows([{k: v[0] for k, v in c.items()} for c in chunks])
  assert single["logits"].shape == (4, 2) and single["labels"].tolist() == [4, 5, 6, 7]


def test_a_run_saves_test_logits_and_labels(backbone, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(backbone, data_dir, **{"eval.save_predictions": True,
                                              "optim.epochs": 1, "optim.warmup_epochs": 0})
  results = trainer.train_and_evaluate(config, workdir)
  assert results["test"]["predictions"] == "predictions_test.npz"
  assert "predictions" not in results["val"]  # the test split only
  logits, labels = predictions.read(os.path.join(workdir, "predictions_test.npz"))
  assert logits.shape == (10, 3) and logits.dtype == np.float16  # 10 images, 3 counts
  stored = tfds.as_numpy(tfds.builder("vpt_sprites/tiny", data_dir=data_dir).as_dataset(
      split="test", shuffle_files=False))
  assert labels.tolist() == [int(e["count"]) for e in stored]  # stored order
  correct = int(np.sum(np.argmax(logits.astype(np.float32), -1) == labels))
  assert abs(correct - round(10 * results["test"]["top1"])) <= 1  # float16 ties aside
  with open(os.path.join(workdir, "results.json")) as f:
    written = json.load(f)
  data = written["data"]
  assert data["test"]["count"] == 10 and sum(data["test"]["classes"]) == 10
  assert data["train"]["count"] == 24 and data["train"]["split"] == "train"
  assert data["val"]["count"] == 8
