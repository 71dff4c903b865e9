"""The VTAB-1k registry: split strings, label functions, classes, and every task
through the pipeline on tfds.testing.mock_data (no download)."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import common
from vpt_jax.data import eval_stream
from vpt_jax.data import source_protocols
from vpt_jax.data import sources
from vpt_jax.data import training_stream
from vpt_jax.data import vtab

NATURAL = ["cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn",
           "sun397"]
SPECIALIZED = ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]
STRUCTURED = ["clevr_count", "clevr_dist", "dmlab", "kitti_dist", "dsprites_loc",
              "dsprites_ori", "smallnorb_azim", "smallnorb_elev"]


# ----------------------------------------------------------------- the registry

def test_nineteen_tasks_in_three_groups():
  assert [t.name for t in vtab.TASKS.values() if t.group == "natural"] == NATURAL
  assert [t.name for t in vtab.TASKS.values() if t.group == "specialized"] == SPECIALIZED
  assert [t.name for t in vtab.TASKS.values() if t.group == "structured"] == STRUCTURED
  assert vtab.task_names("all") == NATURAL + SPECIALIZED + STRUCTURED
  assert vtab.task_names("structured+dmlab+cifar") == STRUCTURED + ["cifar100"]
  classes = {t.name: t.num_classes for t in vtab.TASKS.values()}
  assert classes == {
      "cifar100": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102,
      "oxford_iiit_pet": 37, "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10,
      "resisc45": 45, "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6,
      "dmlab": 6, "kitti_dist": 4, "dsprites_loc": 16, "dsprites_ori": 16,
      "smallnorb_azim": 18, "smallnorb_elev": 9}
  assert {t.name for t in vtab.TASKS.values() if t.manual_download} == {
      "resisc45", "diabetic_retinopathy"}


def test_unknown_task_names_the_close_ones():
  with pytest.raises(ValueError, match="clevr_count"):
    vtab.get_task("clevr_cnt")
  assert vtab.get_task("smallnorb_azi").name == "smallnorb_azim"  # NOAH's folder name


def test_builders_are_the_ones_tfds_4_9_10_can_build(tmp_path):
  for task in vtab.TASKS.values():
    name, _, version = task.builder.partition(":")
    # Only the canonical version can be generated (vtab.md 5).
    assert str(tfds.builder(name, data_dir=str(tmp_path)).version) == version, task.name
  assert vtab.get_task("kitti").builder == "kitti:3.3.0"
  assert vtab.get_task("kitti").reference_builder == "kitti:3.1.0"
  assert vtab.get_task("pets").builder == "oxford_iiit_pet:4.0.0"


@pytest.mark.parametrize("name", list(vtab.TASKS))
def test_literal_splits_equal_the_reference_rule(name):
  task = vtab.TASKS[name]
  assert vtab.compute_splits(task, task.reference_sizes) == dict(task.splits)
  assert task.splits["train800"] == "train[:800]"
  assert task.splits["train800val200"] == "train[:800]+" + task.splits["val200"]
  # The test split's size follows from the same sizes.
  sizes = {k: tfds.core.SplitInfo(name=k, shard_lengths=[v], num_bytes=0,
                                  filename_template=None)
           for k, v in task.reference_sizes.items()}
  instructions = tfds.core.ReadInstruction.from_spec(task.splits["test"]).to_absolute(sizes)
  assert sum(i.to - i.from_ if i.to else sizes[i.splitname].num_examples - (i.from_ or 0)
             for i in instructions) == task.test_size
  assert sum(1 for i in tfds.core.ReadInstruction.from_spec(
      task.splits["val200"]).to_absolute(sizes)) == 1


def test_boundaries_move_with_the_split_sizes_as_in_the_reference():
  caltech = vtab.compute_splits(vtab.get_task("caltech101"), {"train": 1000})
  assert caltech["val200"] == "train[900:1100]"
  eurosat = vtab.compute_splits(vtab.get_task("eurosat"), {"train": 1001})
  # 60 * 1001 // 100 = 600, 20 * 1001 // 100 = 200.
  assert eurosat["val200"] == "train[600:800]" and eurosat["test"] == "train[800:]"
  dsprites = vtab.compute_splits(vtab.get_task("dsprites_ori"), {"train": 1000})
  assert dsprites["val200"] == "train[800:1000]" and dsprites["test"] == "train[900:]"
  norb = vtab.compute_splits(vtab.get_task("smallnorb_elev"), {"train": 5, "test": 8})
  assert norb == {"train800": "train[:800]", "val200": "test[:200]",
                  "train800val200": "train[:800]+test[:200]", "test": "test[50%:]"}


def test_resolve_split(capsys):
  task = vtab.get_task("svhn")
  assert vtab.resolve_split(task, "val200") == "train[65931:66131]"  # no sizes: literal
  assert vtab.resolve_split(task, "test[:10]") == "test[:10]"  # TFDS strings pass
  assert vtab.resolve_split(task, "val200", dict(task.reference_sizes)) == "train[65931:66131]"
  assert capsys.readouterr().err == ""
  assert vtab.resolve_split(task, "val200", {"train": 1000, "test": 5}) == "train[900:1100]"
  assert "differ from the reference" in capsys.readouterr().err


# ----------------------------------------------------------------- label functions

def _clevr(depths, size=None):
  depths = np.asarray(depths, np.float32)
  coords = np.stack([np.zeros_like(depths), np.zeros_like(depths), depths], axis=-1)
  return {"image": tf.zeros((4, 6, 3), tf.uint8),
          "objects": {"size": tf.zeros([size or len(depths)], tf.int64),
                      "pixel_coords": tf.constant(coords.reshape(-1, 3))}}


def _label(fn, example):
  out = fn(example)
  assert out["label"].dtype == tf.int32 and out["label"].shape == ()
  assert out["image"].dtype == tf.uint8 and out["image"].shape[-1] == 3
  return int(out["label"])


def test_clevr_count_is_objects_minus_three():
  for objects in range(3, 11):
    assert _label(vtab.clevr_count, _clevr([9.0] * objects)) == objects - 3


def test_clevr_distance_bins_by_hand():
  # Thresholds 0, 8, 8.5, 9, 9.5, 10, 100; label = max{i : thr_i < d} (strict).
  cases = {8.0: 0, 8.01: 1, 8.5: 1, 8.51: 2, 9.0: 2, 9.5: 3, 10.0: 4, 10.01: 5, 50.0: 5,
           0.5: 0}
  for depth, label in cases.items():
    # The closest object counts: a far one does not change the label.
    assert _label(vtab.clevr_distance, _clevr([depth, 60.0])) == label, depth


def _kitti(objects):
  types = np.array([t for t, _ in objects], np.int64)
  location = np.array([[0.0, 0.0, z] for _, z in objects], np.float32).reshape(-1, 3)
  return {"image": tf.zeros((5, 7, 3), tf.uint8),
          "objects": {"type": tf.constant(types), "location": tf.constant(location)}}


def test_kitti_distance_bins_by_hand():
  car, van, truck, pedestrian, cyclist = 0, 1, 2, 3, 5
  assert _label(vtab.kitti_distance, _kitti([])) == 3  # no vehicle
  assert _label(vtab.kitti_distance, _kitti([(pedestrian, 2.0), (cyclist, 4.0)])) == 3
  assert _label(vtab.kitti_distance, _kitti([(car, 30.0), (van, 15.0)])) == 1
  assert _label(vtab.kitti_distance, _kitti([(pedestrian, 1.0), (truck, 25.0)])) == 2
  for depth, label in {8.0: 0, 8.5: 1, 20.0: 1, 20.5: 2, 999.0: 2, -5.0: 0}.items():
    assert _label(vtab.kitti_distance, _kitti([(car, depth)])) == label, depth


def test_dsprites_bins_and_image_scaling():
  loc, ori = vtab.get_task("dsprites_loc"), vtab.get_task("dsprites_ori")
  image = tf.constant([[[0], [1]], [[1], [0]]], tf.uint8)
  for x, label in {0: 0, 1: 0, 2: 1, 17: 8, 31: 15}.items():
    example = {"image": image, "label_x_position": tf.constant(x, tf.int64)}
    assert _label(loc.preprocess, example) == label
  # 40 orientations in 16 bins of sizes 3, 2, 3, 2, ...
  expected = [int(np.floor(o / 2.5)) for o in range(40)]
  assert expected[:8] == [0, 0, 0, 1, 1, 2, 2, 2] and expected[-1] == 15
  for o in range(40):
    example = {"image": image, "label_orientation": tf.constant(o, tf.int64)}
    assert _label(ori.preprocess, example) == expected[o]
  out = loc.preprocess({"image": image, "label_x_position": tf.constant(0, tf.int64)})
  np.testing.assert_array_equal(out["image"].numpy()[..., 0], [[0, 255], [255, 0]])
  assert out["image"].shape == (2, 2, 3)


def test_smallnorb_tiles_and_keeps_the_attribute():
  image = tf.constant(np.arange(12, dtype=np.uint8).reshape(3, 4, 1))
  example = {"image": image, "label_azimuth": tf.constant(17, tf.int64),
             "label_elevation": tf.constant(8, tf.int64)}
  azim = vtab.get_task("smallnorb_azim").preprocess(example)
  assert int(azim["label"]) == 17
  assert int(vtab.get_task("smallnorb_elev").preprocess(example)["label"]) == 8
  for channel in range(3):  # tiled, not scaled
    np.testing.assert_array_equal(azim["image"].numpy()[..., channel], image.numpy()[..., 0])


# ----------------------------------------------------------------- through TFDS mocks

def _inject_split_sizes(data_dir, builder_name, sizes):
  """Writes dataset_info.json with split sizes, which the mock lacks otherwise."""
  builder = tfds.builder(builder_name, data_dir=data_dir)
  info = builder.info
  info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[count], num_bytes=0,
                          filename_template=None) for name, count in sizes.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  info.write_to_directory(builder.data_dir)


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vtab_mock"))
  for builder in sorted({t.builder for t in vtab.TASKS.values()}):
    task = next(t for t in vtab.TASKS.values() if t.builder == builder)
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


def _data_config(task, data_dir):
  config = common.base_config()
  config.data.task = f"vtab/{task}"
  config.data.data_dir = data_dir
  return config.data


@pytest.mark.parametrize("name", list(vtab.TASKS))
def test_task_through_the_pipeline_on_mock_data(name, mock_dir):
  task = vtab.TASKS[name]
  scenes = name in EXPECTED_SCENE_LABELS
  with tfds.testing.mock_data(num_examples=3, data_dir=mock_dir,
                              as_dataset_fn=_scenes if scenes else None):
    for split in vtab.SPLIT_NAMES:
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
