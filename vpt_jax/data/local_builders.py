"""TFDS builders for data made on this machine: no download, quick to build.

Importing this module registers two datasets with TFDS:

* ``vpt_sprites``: procedural sprite scenes (``vpt_jax.data.sprites``), with
  configs ``pretrain`` (single sprites, for pretraining the shipped backbone),
  ``single`` (single sprites from other seeds, for dSprites-like downstream
  tasks: position, orientation, scale), ``scenes`` (1-6 sprites, for CLEVR-like
  downstream tasks: count, lowest object) and ``tiny`` (a few images, for smoke
  tests).
* ``vpt_digits``: the scikit-learn 8x8 handwritten digits (shipped inside the
  scikit-learn wheel), split 1,000 train / 797 test by a fixed permutation.

They go through the ordinary TFDS path, so the input pipeline reads them like
any other dataset::

  import vpt_jax.data.local_builders  # registers the builders
  builder = tfds.builder("vpt_sprites/scenes", data_dir=data_dir)
  builder.download_and_prepare()
  ds = builder.as_dataset(split="train[:800]+validation[:200]")

Every example is a pure function of the config (and the split), so two builds
anywhere give the same images and labels.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys

import numpy as np
import tensorflow_datasets as tfds

from vpt_jax.data import sprites

try:
  import importlib_resources  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  # TFDS 4.9.10 imports the `importlib_resources` backport when it looks for a
  # builder's code (DatasetBuilder.code_path) but declares it only for Python
  # < 3.9; without it, download_and_prepare of any builder defined in a package
  # fails with ModuleNotFoundError. The standard library module has the one
  # attribute TFDS reads (`abc.Traversable`), so alias it.
  importlib.import_module("importlib.resources.abc")
  sys.modules["importlib_resources"] = importlib.import_module("importlib.resources")

# Images are generated in blocks of this many, each from its own seed, so a
# split is a pure function of (config seed, split, block) whatever its size and
# memory stays bounded. Changing it changes the data: it is part of the format.
_SPRITES_BLOCK = 5000
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(eq=False)
class SpritesConfig(tfds.core.BuilderConfig):
  """What one ``vpt_sprites`` config generates.

  Attributes:
    num_train, num_validation, num_test: split sizes.
    image_size: S of the S x S x 3 images.
    min_objects, max_objects: sprites per image (uniform).
    min_scale, max_scale: sprite radius as a fraction of S (None: the
      ``sprites.default_scale_range`` for max_objects).
    num_scale_bins, num_orientation_bins, num_position_bins: label bins.
    seed: base seed; splits and blocks derive theirs from it.
  """
  num_train: int = 1000
  num_validation: int = 200
  num_test: int = 1000
  image_size: int = 32
  min_objects: int = 1
  max_objects: int = 1
  min_scale: float | None = None
  max_scale: float | None = None
  num_scale_bins: int = 4
  num_orientation_bins: int = 8
  num_position_bins: int = 8
  seed: int = 0

  def generator_kwargs(self) -> dict:
    """The keyword arguments of ``sprites.generate`` this config stands for."""
    return dict(image_size=self.image_size, min_objects=self.min_objects,
                max_objects=self.max_objects, min_scale=self.min_scale,
                max_scale=self.max_scale, num_scale_bins=self.num_scale_bins,
                num_orientation_bins=self.num_orientation_bins,
                num_position_bins=self.num_position_bins)

  def num_classes(self) -> dict[str, int]:
    return sprites.attribute_num_classes(
        min_objects=self.min_objects, max_objects=self.max_objects,
        num_scale_bins=self.num_scale_bins,
        num_orientation_bins=self.num_orientation_bins,
        num_position_bins=self.num_position_bins)


SPRITES_CONFIGS = (
    # Larger sprites than `single`: a from-scratch ViT with 8 px patches learns
    # shape much sooner when sprites span several patches.
    SpritesConfig(
        name="pretrain", version="1.0.0", seed=1, min_scale=0.18, max_scale=0.35,
        num_train=50000, num_validation=2000, num_test=2000,
        description="Single large sprites for pretraining the quickstart backbone "
                    "(labels shape, color, scale_bin)."),
    SpritesConfig(
        name="single", version="1.0.0", seed=2,
        num_train=1000, num_validation=200, num_test=2000,
        description="Single sprites (other seeds than pretrain) for dSprites-like "
                    "tasks: x_bin, y_bin, orientation_bin, scale_bin."),
    SpritesConfig(
        name="scenes", version="1.0.0", seed=3, max_objects=6,
        num_train=1000, num_validation=200, num_test=2000,
        description="1-6 sprites for CLEVR-like tasks: count, lowest_y_bin."),
    SpritesConfig(
        name="tiny", version="1.0.0", seed=4, max_objects=3,
        num_train=24, num_validation=8, num_test=10,
        description="A few 1-3 sprite scenes for smoke tests."),
)


class Sprites(tfds.core.GeneratorBasedBuilder):
  """Procedural sprite scenes with dSprites- and CLEVR-like labels."""

  name = "vpt_sprites"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = list(SPRITES_CONFIGS)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    classes = config.num_classes()
    features = {"image": tfds.features.Image(
        shape=(config.image_size, config.image_size, 3), dtype=np.uint8)}
    for attribute in sprites.ATTRIBUTES:
      if attribute == "shape":
        features[attribute] = tfds.features.ClassLabel(names=list(sprites.SHAPES))
      elif attribute == "color":
        features[attribute] = tfds.features.ClassLabel(names=list(sprites.COLOR_NAMES))
      else:
        features[attribute] = tfds.features.ClassLabel(num_classes=classes[attribute])
    return self.dataset_info_from_configs(
        description=(
            "Procedural sprite scenes (square, ellipse, triangle, cross, heart) "
            "generated by vpt_jax.data.sprites; labels describe the largest sprite "
            "(shape, color, scale/orientation/position bins) and the scene "
            "(count = sprites - 1, lowest_y_bin)."),
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("image", "shape"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    sizes = {"train": config.num_train, "validation": config.num_validation,
             "test": config.num_test}
    return {split: self._generate_examples(split, size)
            for split, size in sizes.items()}

  def _generate_examples(self, split: str, size: int):
    config = self.builder_config
    for block_start in range(0, size, _SPRITES_BLOCK):
      count = min(_SPRITES_BLOCK, size - block_start)
      block = block_start // _SPRITES_BLOCK
      seed = (config.seed * 1000 + _SPLIT_IDS[split]) * 100000 + block
      data = sprites.generate(count, seed, **config.generator_kwargs())
      for i in range(count):
        example = {"image": data["image"][i]}
        example.update({name: int(data[name][i]) for name in sprites.ATTRIBUTES})
        yield block_start + i, example


# The digits split: a fixed permutation (seed 0) of scikit-learn's 1,797
# images, the first 1,000 for train and the other 797 for test.
DIGITS_NUM_TRAIN = 1000
DIGITS_SEED = 0


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits permuted: images uint8 (N, 8, 8, 3), labels int64 (N,).

  Pixel values 0..16 are scaled to 0..255 (rounded); grey is tiled to RGB.
  """
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  order = np.random.default_rng(DIGITS_SEED).permutation(len(images))
  return images[order], digits.target[order].astype(np.int64)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits as an RGB image dataset."""

  name = "vpt_digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: 1,000 train / 797 test."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=("The UCI/scikit-learn optical-recognition handwritten digits "
                     "(8x8, values 0..16 scaled to 0..255, grey tiled to RGB), "
                     f"permuted with seed {DIGITS_SEED}: first {DIGITS_NUM_TRAIN} "
                     "train, the rest test."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships inside the scikit-learn wheel.
    images, labels = digits_arrays()
    return {
        "train": self._generate_examples(images[:DIGITS_NUM_TRAIN],
                                         labels[:DIGITS_NUM_TRAIN]),
        "test": self._generate_examples(images[DIGITS_NUM_TRAIN:],
                                        labels[DIGITS_NUM_TRAIN:]),
    }

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}


# Builders that prepare without any download; the input pipeline may prepare
# them on first use.
LOCAL_BUILDER_NAMES = (Sprites.name, SklearnDigits.name)
