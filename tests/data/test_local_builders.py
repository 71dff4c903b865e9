"""The local TFDS builders build through the ordinary TFDS path, offline."""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vpt_jax.data import local_builders
from vpt_jax.data import sprites


def _examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def _digest(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  for name in ("vpt_sprites/tiny", "vpt_digits"):
    tfds.builder(name, data_dir=path).download_and_prepare()
  return path


def test_sprites_splits_and_features(data_dir):
  builder = tfds.builder("vpt_sprites/tiny", data_dir=data_dir)
  assert builder.is_prepared()
  config = builder.builder_config
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": config.num_train, "validation": config.num_validation,
      "test": config.num_test}
  features = builder.info.features
  assert features["image"].shape == (32, 32, 3)
  assert features["image"].dtype == np.uint8
  classes = sprites.attribute_num_classes(min_objects=1, max_objects=3)
  for name in sprites.ATTRIBUTES:
    assert isinstance(features[name], tfds.features.ClassLabel), name
    assert features[name].num_classes == classes[name], name
  assert features["shape"].names == list(sprites.SHAPES)
  examples = _examples(builder, "train")
  assert len(examples) == config.num_train
  for example in examples:
    assert example["image"].dtype == np.uint8 and example["image"].shape == (32, 32, 3)
    assert example["count"].dtype == np.int64 and 0 <= example["count"] < 3


def test_sprites_examples_are_the_generator_output(data_dir):
  """The stored train split holds exactly the generator's images and labels."""
  builder = tfds.builder("vpt_sprites/tiny", data_dir=data_dir)
  config = builder.builder_config
  expected = sprites.generate(config.num_train, (config.seed * 1000 + 0) * 100000,
                              **config.generator_kwargs())
  want = {_digest(expected["image"][i]): int(expected["count"][i])
          for i in range(config.num_train)}
  got = {_digest(e["image"]): int(e["count"]) for e in _examples(builder, "train")}
  assert got == want


def test_sprites_custom_config_overrides_sizes(tmp_path):
  config = local_builders.SpritesConfig(
      name="custom", version="1.0.0", num_train=5, num_validation=2, num_test=3,
      image_size=16, max_objects=2, seed=11)
  builder = tfds.builder("vpt_sprites", config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert builder.info.splits["train"].num_examples == 5
  assert builder.info.splits["test"].num_examples == 3
  assert builder.info.features["image"].shape == (16, 16, 3)
  assert builder.info.features["count"].num_classes == 2


def test_digits_splits_features_and_values(data_dir):
  builder = tfds.builder("vpt_digits", data_dir=data_dir)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      "train": 1000, "test": 797}
  assert builder.info.features["image"].shape == (8, 8, 3)
  assert builder.info.features["label"].num_classes == 10
  train, test = _examples(builder, "train"), _examples(builder, "test")
  images, labels = local_builders.digits_arrays()
  # The split is the fixed permutation: train holds its first 1,000 digits.
  want = sorted((_digest(images[i]), int(labels[i])) for i in range(1000))
  assert sorted((_digest(e["image"]), int(e["label"])) for e in train) == want
  all_images = np.stack([e["image"] for e in train + test])
  assert all_images.max() == 255 and all_images.min() == 0
  # Grey tiled to RGB.
  np.testing.assert_array_equal(all_images[..., 0], all_images[..., 2])
  # Every value is a multiple of 255/16, rounded.
  levels = set(np.round(np.arange(17) * 255 / 16).astype(int))
  assert set(np.unique(all_images)) <= levels
