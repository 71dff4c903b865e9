"""Small data the data tests share: image files, configs, prepared TFDS folders, raw
VTAB examples written by hand."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import common


def write_image(path, value, size=(6, 5)):
  """A PNG (lossless, so decoded pixels are known) of constant ``value``."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.full(size + (3,), value, np.uint8)
  pixels[0, 0] = (value, 0, 255 - value)
  Image.fromarray(pixels).save(path)
  return pixels


def data_config(**fields):
  """``config.data`` of the base config with ``fields`` set."""
  config = common.base_config()
  for key, value in fields.items():
    config.data[key] = value
  return config.data


def prepared_tfds_dir(tmp_path_factory, names=("vpt_sprites/tiny",)) -> str:
  """A fresh TFDS data_dir with the local builders ``names`` prepared."""
  path = str(tmp_path_factory.mktemp("tfds"))
  for name in names:
    tfds.builder(name, data_dir=path).download_and_prepare()
  return path


def digest(image) -> str:
  """A hash of an image's pixels, to compare sets of images."""
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def clevr_example(depths, size=None):
  """A raw CLEVR example: objects at the given depths (``size`` objects, default one each)."""
  depths = np.asarray(depths, np.float32)
  coords = np.stack([np.zeros_like(depths), np.zeros_like(depths), depths], axis=-1)
  return {"image": tf.zeros((4, 6, 3), tf.uint8),
          "objects": {"size": tf.zeros([size or len(depths)], tf.int64),
                      "pixel_coords": tf.constant(coords.reshape(-1, 3))}}


def kitti_example(objects):
  """A raw KITTI example of (object type, depth) pairs."""
  types = np.array([t for t, _ in objects], np.int64)
  location = np.array([[0.0, 0.0, z] for _, z in objects], np.float32).reshape(-1, 3)
  return {"image": tf.zeros((5, 7, 3), tf.uint8),
          "objects": {"type": tf.constant(types), "location": tf.constant(location)}}


def inject_split_sizes(data_dir, builder_name, sizes):
  """Writes dataset_info.json with split sizes, which tfds.testing.mock_data lacks otherwise."""
  builder = tfds.builder(builder_name, data_dir=data_dir)
  info = builder.info
  info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[count], num_bytes=0,
                          filename_template=None) for name, count in sizes.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  info.write_to_directory(builder.data_dir)
