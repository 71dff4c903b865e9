"""Per-task exports: tiny, complete, atomic, never pickle."""

import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.params import freezing
from vpt_jax.params import trees


def _b16_vpt_deep_params(num_prompts=50, num_classes=10):
  """ViT-B/16 VPT-deep shapes; only the trainable leaves are real arrays."""
  spec = dict(method="vpt_deep", variant="B/16", image_size=224, dropout_rate=0.1,
              skip_dead_work=True, dtype="float32", num_prompts=num_prompts,
              prompt_dropout=0.1, prompt_projection=-1, pool="original")
  model = factory.build_model(spec, num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 224, 224, 3))))["params"]
  labels = freezing.label_params(shapes, registry.get_method("vpt_deep").trainable_rules)
  flat_labels = trees.flatten(labels)
  params = trees.unflatten({
      path: (np.full(s.shape, 0.5, np.float32) if flat_labels[path] == "train" else s)
      for path, s in trees.flatten(shapes).items()})
  return spec, params, labels


def test_vpt_deep_b16_export_is_about_1_8_mb(tmp_path):
  spec, params, labels = _b16_vpt_deep_params()
  directory = task_export.export_task(
      str(tmp_path / "export"), params, labels, spec=spec, num_classes=10,
      class_names=None, normalization={"mean": (0.5,) * 3, "std": (0.5,) * 3},
      backbone_path="gs://vit_models/imagenet21k/ViT-B_16.npz",
      backbone_fingerprint="0" * 64, init_seed=0)
  size = os.path.getsize(os.path.join(directory, task_export.PARAMS_FILE))
  # 12 blocks x 50 prompts x 768 floats + a 768 x 10 head, 4 bytes each.
  expected_bytes = (12 * 50 * 768 + 768 * 10 + 10) * 4
  assert expected_bytes <= size < expected_bytes + 4096
  assert 1.7e6 < size < 1.9e6
  with open(os.path.join(directory, task_export.METADATA_FILE)) as f:
    metadata = json.load(f)
  assert metadata["trainable_params"] == 12 * 50 * 768 + 7690
  assert metadata["params"] == ["head/bias", "head/kernel", "vpt/deep", "vpt/shallow"]
  assert metadata["backbone"]["sha256"] == "0" * 64
  # npz members are plain .npy arrays: nothing that needs unpickling.
  with zipfile.ZipFile(os.path.join(directory, task_export.PARAMS_FILE)) as archive:
    assert sorted(archive.namelist()) == sorted(f"{p}.npy" for p in metadata["params"])
  leftovers = [n for n in os.listdir(directory) if "tmp" in n]
  assert not leftovers


def test_incomplete_export_is_refused(tmp_path):
  directory = tmp_path / "export"
  directory.mkdir()
  with pytest.raises(task_export.ExportError, match="task.json is missing"):
    task_export.read_export(str(directory))


def test_export_trained_from_scratch_loads_alone_and_refuses_a_backbone(tmp_path):
  spec = dict(method="full", variant="test/4", image_size=16, dropout_rate=0.0,
              skip_dead_work=True, dtype="float32", num_prompts=0, prompt_dropout=0.0,
              prompt_projection=-1, pool="original")
  model = factory.build_model(spec, 3)
  params = model.init(jax.random.key(7), jnp.zeros((1, 16, 16, 3)))["params"]
  labels = freezing.label_params(params, registry.get_method("full").trainable_rules)
  directory = task_export.export_task(
      str(tmp_path / "export"), params, labels, spec=spec, num_classes=3, class_names=None,
      normalization={"mean": (0.5,) * 3, "std": (0.5,) * 3}, backbone_path="",
      backbone_fingerprint=None, init_seed=0)
  _, variables, _ = task_export.load_task_variables(directory)
  for path, value in trees.flatten(params).items():
    np.testing.assert_array_equal(trees.flatten(variables["params"])[path], value)
  # A backbone file would be silently unused: every parameter is in the export.
  with pytest.raises(task_export.ExportError, match="trained from scratch"):
    task_export.load_task_variables(directory, str(tmp_path / "ViT-B_16.npz"))
