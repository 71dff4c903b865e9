"""The VTAB-1k label functions: raw TFDS example -> {"image", "label"} per task.

Each follows the reference code (google-research/task_adaptation, as VPT uses
it; see ../shared/reference/vtab.md): CLEVR count - 3, distance bins, dSprites
bins, smallNORB attributes; greyscale is tiled to RGB. ``vtab_tasks`` names the
function of each task.
"""

from __future__ import annotations

import tensorflow as tf

# Each takes a raw TFDS example (dict of tensors) and returns
# {"image": uint8 (H, W, 3), "label": int32 ()}.

def _rgb(image):
  """Tiles a greyscale (H, W, 1) image to RGB; RGB passes through."""
  if image.shape[-1] == 1:
    return tf.tile(image, [1, 1, 3])
  return image


def _count_below(thresholds, value):
  """max{i : thresholds[i] < value} for ascending thresholds (-1 if none).

  The reference computes reduce_max(where(thresholds - value < 0)); for sorted
  thresholds that is the number of thresholds strictly below value, minus one.
  """
  below = tf.cast(tf.constant(thresholds, tf.float32) < tf.cast(value, tf.float32), tf.int32)
  return tf.reduce_sum(below) - 1


def plain_label(example, label_key: str = "label"):
  """The TFDS ClassLabel as it is."""
  return {"image": _rgb(example["image"]), "label": tf.cast(example[label_key], tf.int32)}


def clevr_count(example):
  """Number of objects - 3 (CLEVR scenes hold 3..10 objects: labels 0..7)."""
  count = tf.size(example["objects"]["size"])
  return {"image": _rgb(example["image"]), "label": tf.cast(count - 3, tf.int32)}


CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)


def clevr_distance(example):
  """Bin of the closest object's depth (pixel_coords[:, 2]); 6 classes.

  0: d <= 8.0, 1: (8.0, 8.5], 2: (8.5, 9.0], 3: (9.0, 9.5], 4: (9.5, 10.0],
  5: (10.0, 100].
  """
  depth = tf.reduce_min(example["objects"]["pixel_coords"][:, 2])
  return {"image": _rgb(example["image"]),
          "label": _count_below(CLEVR_DISTANCE_THRESHOLDS, depth)}


KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
# KITTI object types Car=0, Van=1, Truck=2 are the vehicles.
KITTI_VEHICLE_TYPES = 3
KITTI_NO_VEHICLE_DEPTH = 1000.0


def kitti_distance(example):
  """Bin of the closest vehicle's depth (location[:, 2] of car/van/truck); 4 classes.

  0: d <= 8 m, 1: (8, 20], 2: (20, 999], 3: no vehicle (the reference appends
  a depth of 1000 before taking the minimum).
  """
  objects = example["objects"]
  vehicles = objects["type"] < KITTI_VEHICLE_TYPES
  depths = tf.boolean_mask(objects["location"][:, 2], vehicles)
  depths = tf.concat([tf.cast(depths, tf.float32), [KITTI_NO_VEHICLE_DEPTH]], axis=0)
  return {"image": _rgb(example["image"]),
          "label": _count_below(KITTI_DISTANCE_THRESHOLDS, tf.reduce_min(depths))}


def dsprites(example, attribute: str, num_original: int, num_classes: int = 16):
  """floor(attribute / (num_original / num_classes)); image {0,1} -> {0,255} RGB.

  Location: 32 x positions / 2 -> 16 classes; orientation: 40 values / 2.5 ->
  16 bins of alternating size 3, 2, 3, 2, ...
  """
  factor = num_original / num_classes
  label = tf.math.floordiv(tf.cast(example[attribute], tf.float32), factor)
  # Forgetting the x255 leaves an almost black image.
  return {"image": _rgb(example["image"]) * 255, "label": tf.cast(label, tf.int32)}


def smallnorb(example, attribute: str):
  """The raw attribute (azimuth 0..17, elevation 0..8); first image of the pair."""
  return {"image": _rgb(example["image"]), "label": tf.cast(example[attribute], tf.int32)}
