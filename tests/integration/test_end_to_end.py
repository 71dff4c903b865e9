"""The main job end to end on a locally built dataset and a fixture backbone:
train, evaluate, checkpoint, export, reload (resuming: test_loop.py)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from run_fixtures import tiny_config
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import vit_layouts
from vpt_jax.export import task_export
from vpt_jax.params import trees
from vpt_jax.training import trainer

# backbone and data_dir: fixtures of conftest.py.


def test_train_evaluate_export_and_reload(backbone, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  results = trainer.train_and_evaluate(tiny_config(backbone, data_dir), workdir)
  # Every test example counted exactly once despite padding (10 = 4 + 4 + 2).
  assert results["test"]["count"] == 10 and results["val"]["count"] == 8
  # Trainable: 2 prompt sets (2 blocks) of 2 x 16, plus a 16 x 3 head and its bias.
  assert results["trainable_params"] == 2 * 2 * 16 + 16 * 3 + 3
  for name in ("config.json", "metrics.jsonl", "results.json", "export/task.npz",
               "export/task.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert {"train/loss", "train/learning_rate"} <= set(records[0])
  assert any("test/top1" in r for r in records)

  # Reload = backbone file + export: the backbone values come from the file and
  # the trained values from the export.
  model, params, metadata = task_export.load_task(results["export"])
  assert metadata["model"]["method"] == "vpt_deep"
  flat = trees.flatten(params)
  _, exported = task_export.read_export(results["export"])
  file_values = vit_layouts.to_model_layout(npz.read_npz(backbone), "vit_raw")
  for path, value in flat.items():
    expected = exported[path] if path in exported else file_values[path]
    np.testing.assert_array_equal(np.asarray(value), expected, err_msg=path)
  # The rebuilt model classifies into the task's classes.
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  logits = model.apply({"params": params}, jnp.asarray(images, jnp.float32) / 255.0)
  assert logits.shape == (4, 3)


def test_export_refuses_a_different_backbone_or_method(backbone, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  results = trainer.train_and_evaluate(
      tiny_config(backbone, data_dir, **{"optim.epochs": 1, "optim.warmup_epochs": 0}),
      workdir)
  other = str(tmp_path / "other.npz")
  arrays = npz.read_npz(backbone)
  arrays["cls"] = arrays["cls"] + 1.0
  npz.save_npz(arrays, other)
  with pytest.raises(task_export.ExportError, match="Backbone mismatch"):
    task_export.load_task(results["export"], other)
  with pytest.raises(task_export.ExportError, match="not 'linear'"):
    task_export.load_task(results["export"], expected_method="linear")


@pytest.mark.parametrize("overrides, message", [
    ({"method": "vpt_dep"}, "did you mean vpt_deep"),
    ({"model.variant": "B/17x"}, "Unknown ViT variant"),
    ({"model.image_size": 30}, "not divisible by the patch size 4"),
    ({"prompt.num_prompts": 0}, "num_prompts >= 1"),
    ({"data.num_classes": 5}, "has 3 classes"),
    ({"model.init_checkpoint": "/nonexistent/ViT-B_16.npz"}, "does not exist"),
])
def test_bad_input_fails_before_compute(backbone, data_dir, tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(tiny_config(backbone, data_dir, **overrides),
                               str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
