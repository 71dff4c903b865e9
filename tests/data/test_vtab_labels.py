"""The VTAB-1k label functions, on raw examples written by hand."""

import numpy as np
import tensorflow as tf

import data_fixtures
from vpt_jax.data import vtab_labels
from vpt_jax.data import vtab_tasks

# Raw examples written by hand (shared with test_vtab.py).
_clevr = data_fixtures.clevr_example
_kitti = data_fixtures.kitti_example


def _label(fn, example):
  out = fn(example)
  assert out["label"].dtype == tf.int32 and out["label"].shape == ()
  assert out["image"].dtype == tf.uint8 and out["image"].shape[-1] == 3
  return int(out["label"])


def test_clevr_count_is_objects_minus_three():
  for objects in range(3, 11):
    assert _label(vtab_labels.clevr_count, _clevr([9.0] * objects)) == objects - 3


def test_clevr_distance_bins_by_hand():
  # Thresholds 0, 8, 8.5, 9, 9.5, 10, 100; label = max{i : thr_i < d} (strict).
  cases = {8.0: 0, 8.01: 1, 8.5: 1, 8.51: 2, 9.0: 2, 9.5: 3, 10.0: 4, 10.01: 5, 50.0: 5,
           0.5: 0}
  for depth, label in cases.items():
    # The closest object counts: a far one does not change the label.
    assert _label(vtab_labels.clevr_distance, _clevr([depth, 60.0])) == label, depth


def test_kitti_distance_bins_by_hand():
  car, van, truck, pedestrian, cyclist = 0, 1, 2, 3, 5
  assert _label(vtab_labels.kitti_distance, _kitti([])) == 3  # no vehicle
  assert _label(vtab_labels.kitti_distance, _kitti([(pedestrian, 2.0), (cyclist, 4.0)])) == 3
  assert _label(vtab_labels.kitti_distance, _kitti([(car, 30.0), (van, 15.0)])) == 1
  assert _label(vtab_labels.kitti_distance, _kitti([(pedestrian, 1.0), (truck, 25.0)])) == 2
  for depth, label in {8.0: 0, 8.5: 1, 20.0: 1, 20.5: 2, 999.0: 2, -5.0: 0}.items():
    assert _label(vtab_labels.kitti_distance, _kitti([(car, depth)])) == label, depth


def test_dsprites_bins_and_image_scaling():
  loc, ori = vtab_tasks.get_task("dsprites_loc"), vtab_tasks.get_task("dsprites_ori")
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
  azim = vtab_tasks.get_task("smallnorb_azim").preprocess(example)
  assert int(azim["label"]) == 17
  assert int(vtab_tasks.get_task("smallnorb_elev").preprocess(example)["label"]) == 8
  for channel in range(3):  # tiled, not scaled
    np.testing.assert_array_equal(azim["image"].numpy()[..., channel], image.numpy()[..., 0])
