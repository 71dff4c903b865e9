"""VTAB-1k split strings resolved against the prepared data, the missing-data steps, and
every task through the pipeline on tfds.testing.mock_data (no download)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import data_fixtures
from vpt_jax.data import eval_stream
from vpt_jax.data import source_protocols
from vpt_jax.data import sources
from vpt_jax.data import training_stream
from vpt_jax.data import vtab
from vpt_jax.data import vtab_tasks

# Raw examples written by hand (shared with test_vtab_labels.py).
_clevr = data_fixtures.clevr_example
_kitti = data_fixtures.kitti_example


def _data_config(task, data_dir):
  return data_fixtures.data_config(task=f"vtab/{task}", data_dir=data_dir)


def test_resolve_split(capsys):
  task = vtab_tasks.get_task("svhn")
  assert vtab.resolve_split(task, "val200") == "train[65931:66131]"  # no sizes: literal
  assert vtab.resolve_split(task, "test[:10]") == "test[:10]"  # TFDS strings pass
  assert vtab.resolve_split(task, "val200", dict(task.reference_sizes)) == "train[65931:66131]"
  assert capsys.readouterr().err == ""
  assert vtab.resolve_split(task, "val200", {"train": 1000, "test": 5}) == "train[900:1100]"
  assert "differ from the reference" in capsys.readouterr().err


# ----------------------------------------------------------------- through TFDS mocks

_inject_split_sizes = data_fixtures.inject_split_sizes


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vtab_mock"))
  for builder in sorted({t.builder for t in vtab_tasks.TASKS.values()}):
    task = next(t for t in vtab_tasks.TASKS.values() if t.builder == builder)
    _inject_split_sizes(path, builder, task.reference_sizes)
  return path


def _scenes(builder, split, **kwargs):
  """Hand-made CLEVR/KITTI examples (the random mock's object lists disagree in
  length, which no real example does)."""
  del split, kwargs
  if builder.name == "clevr":  # 3, 5, 10 objects; closest depths 7.0, 9.2, 12.0
    examples = [_clevr([7.0, 11.0, 12.0]), _clevr([9.2] * 5), _clevr([12.0] * 10)]
  else:  # closest vehicle at 5 m, 15 m, none
    examples = [_kitti([(0, 5.0), (3, 1.0)]), _kitti([(2, 15.0), (1, 40.0)]), _kitti([(4, 3.0)])]
  images = [tf.fill([6 + i, 9, 3], tf.constant(i * 50, tf.uint8)) for i in range(3)]
  examples = [{**e, "image": im} for e, im in zip(examples, images)]
  return tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature=tf.nest.map_structure(
          lambda t: tf.TensorSpec([None] + t.shape[1:].as_list(), t.dtype), examples[0]))


EXPECTED_SCENE_LABELS = {"clevr_count": [0, 2, 7], "clevr_dist": [0, 3, 5],
                         "kitti_dist": [0, 1, 3]}


@pytest.mark.parametrize("name", list(vtab_tasks.TASKS))
def test_task_through_the_pipeline_on_mock_data(name, mock_dir):
  task = vtab_tasks.TASKS[name]
  scenes = name in EXPECTED_SCENE_LABELS
  with tfds.testing.mock_data(num_examples=3, data_dir=mock_dir,
                              as_dataset_fn=_scenes if scenes else None):
    for split in vtab_tasks.SPLIT_NAMES:
      source = sources.make_source(_data_config(name, mock_dir), split)
      assert source.split == task.splits[split]  # computed from the injected sizes
      assert source_protocols.num_classes(source) == task.num_classes
    assert source_protocols.num_examples(source) == task.test_size
    images, labels = training_stream.load_split_arrays(source, image_size=8)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert labels.shape == (3,) and labels.dtype == np.int32
    assert ((0 <= labels) & (labels < task.num_classes)).all(), labels
    if scenes:
      assert labels.tolist() == EXPECTED_SCENE_LABELS[name]
    batch = next(eval_stream.eval_batches(source, image_size=8, local_batch=4))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["mask"].tolist() == [1, 1, 1, 0]


def test_missing_data_shows_the_manual_download_steps(tmp_path):
  source = sources.make_source(_data_config("resisc45", str(tmp_path)), "train800val200")
  with pytest.raises(FileNotFoundError, match="NWPU-RESISC45") as error:
    training_stream.load_split_arrays(source, image_size=8)
  assert "--manual_dir" in str(error.value)
  source = sources.make_source(_data_config("dmlab", str(tmp_path)), "test")
  with pytest.raises(FileNotFoundError, match="vpt_jax.data.vtab prepare dmlab"):
    source_protocols.num_examples(source)
