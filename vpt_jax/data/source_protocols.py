"""What the input pipeline reads: a split of a TFDS dataset or of any other source.

A plain TFDS split is an ``ImageSource``; anything else (VTAB tasks with label
functions, image files listed in JSON or text files, image folders:
``vpt_jax.data.sources``) implements ``ExampleSource``. The functions here read
either kind the same way: its size (whole or one process's share), its classes
and its decoded examples in stored order.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Protocol, Union

import tensorflow as tf
import tensorflow_datasets as tfds

from vpt_jax import errors
from vpt_jax.data import local_builders


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """How to read one split of a TFDS dataset.

  Attributes:
    builder: TFDS name[/config][:version], e.g. "vpt_sprites/scenes" or
      "dmlab:2.0.1".
    split: TFDS split string, e.g. "train[:800]+validation[:200]".
    data_dir: TFDS data directory (None: the TFDS default).
    image_key: the image feature.
    label_key: the integer label feature (a ClassLabel).
  """
  builder: str
  split: str
  data_dir: Optional[str]
  image_key: str = "image"
  label_key: str = "label"


class ExampleSource(Protocol):
  """A split of any other dataset, as the pipeline reads it.

  ``builder`` and ``split`` only name the data in messages.
  """
  builder: str
  split: str

  def examples(self, process_index: int, process_count: int) -> tf.data.Dataset:
    """This process's share, in a fixed order: {"image": uint8 (H, W, 1 or 3),
    "label": int32 ()}. Shares differ in size by at most one example."""

  def size(self, process_index: int, process_count: int) -> int:
    """Examples in this process's share (an upper bound if some may be skipped)."""

  def num_classes(self) -> int:
    ...

  def class_names(self) -> Optional[list[str]]:
    ...


AnySource = Union[ImageSource, ExampleSource]


def prepared_builder(source: ImageSource) -> tfds.core.DatasetBuilder:
  """The TFDS builder of ``source``, prepared.

  The datasets of ``local_builders`` are built on first use (a few seconds, no
  download); anything else must have been prepared beforehand.
  """
  builder = tfds.builder(source.builder, data_dir=source.data_dir)
  if not builder.is_prepared():
    if builder.name in local_builders.LOCAL_BUILDER_NAMES:
      builder.download_and_prepare()
    elif getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
      data_dir = source.data_dir or tfds.core.constants.DATA_DIR
      manual_dir = os.path.join(data_dir, "downloads", "manual")
      raise errors.MissingInputError(
          f"TFDS dataset {source.builder!r} is not prepared in data_dir={data_dir!r} and "
          f"needs a manual download. Put the files in {manual_dir} as its instructions "
          f"say, then run `tfds build {source.builder} --data_dir={data_dir} "
          f"--manual_dir={manual_dir}`. Instructions:\n"
          f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    else:
      raise errors.MissingInputError(
          f"TFDS dataset {source.builder!r} is not prepared in data_dir="
          f"{builder.data_dir!r}. Prepare it first (e.g. `tfds build "
          f"{source.builder} --data_dir=...`) or point data_dir at a directory that "
          "holds it.")
  features = builder.info.features
  for key in (source.image_key, source.label_key):
    if key not in features:
      raise KeyError(f"{source.builder!r} has no feature {key!r}; its features are "
                     f"{sorted(features.keys())}. Set image_key/label_key.")
  return builder


def _is_plain_tfds(source: AnySource) -> bool:
  return isinstance(source, ImageSource)


def process_split(split: str, process_index: int, process_count: int) -> str:
  """This process's share of ``split`` (tfds.even_splits, no example dropped)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if process_count == 1:
    return split
  return tfds.even_splits(split, process_count, drop_remainder=False)[process_index]


def share_size(source: AnySource, process_index: int, process_count: int) -> int:
  """Examples in this process's share of ``source.split`` (TFDS metadata, no decoding)."""
  if not _is_plain_tfds(source):
    return source.size(process_index, process_count)
  split = process_split(source.split, process_index, process_count)
  return prepared_builder(source).info.splits[split].num_examples


def num_examples(source: AnySource) -> int:
  """Examples in ``source.split`` (from the TFDS metadata, no decoding)."""
  return share_size(source, 0, 1)


def num_classes(source: AnySource) -> int:
  """Classes of the ClassLabel feature ``source.label_key``."""
  if not _is_plain_tfds(source):
    return source.num_classes()
  feature = prepared_builder(source).info.features[source.label_key]
  if not isinstance(feature, tfds.features.ClassLabel):
    raise TypeError(f"{source.builder!r} feature {source.label_key!r} is "
                    f"{type(feature).__name__}, not a ClassLabel; choose an integer "
                    "class label feature.")
  return feature.num_classes


def class_names(source: AnySource) -> Optional[list[str]]:
  """Names of the label classes, or None when the dataset only numbers them."""
  if not _is_plain_tfds(source):
    return source.class_names()
  feature = prepared_builder(source).info.features[source.label_key]
  names = list(getattr(feature, "names", None) or [])
  if not names or names == [str(i) for i in range(len(names))]:
    return None
  return names


def decoded_examples(source: AnySource, process_index: int,
              process_count: int) -> tf.data.Dataset:
  """This process's share, decoded: {"image": uint8 (H, W, C), "label": int32}."""
  if not _is_plain_tfds(source):
    return source.examples(process_index, process_count)
  builder = prepared_builder(source)
  split = process_split(source.split, process_index, process_count)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return ds.map(lambda example: {"image": example[source.image_key],
                                 "label": tf.cast(example[source.label_key], tf.int32)},
                num_parallel_calls=tf.data.AUTOTUNE)
