"""Per-task exports: tiny, complete, atomic, never pickle."""

import errno
import json
import os
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

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


def _tiny_export(directory, value):
  """An export of two trainable leaves, every value ``value`` (no model needed to read it)."""
  params = {"head": {"kernel": np.full((4, 3), value, np.float32),
                     "bias": np.full((3,), value, np.float32)}, "cls": np.ones(4, np.float32)}
  labels = {"head": {"kernel": "train", "bias": "train"}, "cls": "frozen"}
  return task_export.export_task(
      str(directory), params, labels, spec={"image_size": 16}, num_classes=3,
      class_names=None, normalization={"mean": (0.5,) * 3, "std": (0.5,) * 3},
      backbone_path=None, backbone_fingerprint=None, init_seed=0)


def _full_disk_in_the_parameters(monkeypatch):
  """The second array of task.npz fails to write, as on a full disk."""
  original, written = np.lib.format.write_array, []

  def write_array(fp, array, *args, **kwargs):
    written.append(array)
    if len(written) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(fp, array, *args, **kwargs)

  monkeypatch.setattr(np.lib.format, "write_array", write_array)


def _full_disk_in_the_metadata(monkeypatch):
  """task.npz is complete, then writing task.json fails."""
  original = tf.io.gfile.GFile

  def gfile(path, mode="r"):
    if path.endswith(f"{task_export.METADATA_FILE}.tmp-{os.getpid()}") and "w" in mode:
      raise OSError(errno.ENOSPC, "No space left on device", path)
    return original(path, mode)

  monkeypatch.setattr(tf.io.gfile, "GFile", gfile)


@pytest.mark.parametrize("inject", [_full_disk_in_the_parameters, _full_disk_in_the_metadata])
def test_a_failing_disk_during_an_export_keeps_the_previous_export(tmp_path, monkeypatch,
                                                                   inject):
  directory = _tiny_export(tmp_path / "export", 1.0)
  inject(monkeypatch)
  with pytest.raises(task_export.ExportError,
                     match=r"could not write the export in .*No space left on device.*the "
                           r"previous export there is intact"):
    _tiny_export(tmp_path / "export", 2.0)
  monkeypatch.undo()
  _, flat = task_export.read_export(directory)
  np.testing.assert_array_equal(flat["head/kernel"], np.full((4, 3), 1.0))
  assert sorted(os.listdir(directory)) == [task_export.METADATA_FILE, task_export.PARAMS_FILE]


def _params_from_another_save(directory, tmp_path):
  # What a crash between the two renames would leave: the new task.npz, the old task.json.
  other = _tiny_export(tmp_path / "other", 5.0)
  shutil.copy(os.path.join(other, task_export.PARAMS_FILE), directory)


def _missing_params(directory, tmp_path):
  os.remove(os.path.join(directory, task_export.PARAMS_FILE))


def _truncated_params(directory, tmp_path):
  path = os.path.join(directory, task_export.PARAMS_FILE)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _garbled_metadata(directory, tmp_path):
  with open(os.path.join(directory, task_export.METADATA_FILE), "w") as f:
    f.write('{"format": "vpt_jax.task_export", ')


@pytest.mark.parametrize("damage, message", [
    (_params_from_another_save, r"task.npz is not the file task.json was written with"),
    (_missing_params, r"task.npz is missing; the export is incomplete"),
    (_truncated_params, r"task.npz is damaged \(not a readable .npz\)"),
    (_garbled_metadata, r"task.json is damaged \(not JSON"),
])
def test_a_broken_export_names_the_broken_file_and_how_to_rewrite_it(tmp_path, damage,
                                                                     message):
  directory = _tiny_export(tmp_path / "export", 1.0)
  damage(directory, tmp_path)
  with pytest.raises(task_export.ExportError, match=message) as error:
    task_export.read_export(directory)
  assert "run.py --mode export" in str(error.value)
  assert "ViT-B" not in str(error.value)  # not a backbone download hint
  assert "\n" not in str(error.value)
