"""Input pipeline: TFDS splits to numpy training arrays and padded eval batches.

Training sets in VTAB-1k are small (1,000 images), so a training split is
decoded once into numpy (``load_split_arrays``) and batches are index arrays
into it (``train_batches``), a pure function of (seed, step): resuming needs no
data-loader state. Evaluation splits can be large, so ``eval_batches`` streams
them with tf.data, one share per process, padded so every process runs the same
number of steps (the big_vision ``make_for_inference`` convention: padding rows
are zero images with ``mask=False``).

Images leave this module as uint8; ``data.normalization.normalize_images`` maps them to floats on
the device, which keeps host-to-device transfers four times smaller.

Resizing follows the VTAB reference (task_adaptation, TF1): bilinear without
half-pixel centres (``tf.compat.v1.image.resize_bilinear`` with
``align_corners=False, half_pixel_centers=False``); the result is rounded back
to uint8, which differs from the reference's float pipeline by at most half a
grey level.

Two preprocessings (``PREPROCESS_MODES``): "resize" squashes every image to
S x S with no augmentation (VTAB); "resize_crop_flip" resizes the shorter side
to ``crop_resize_size(S)`` (256 for S = 224), then takes a random S x S crop
and a random horizontal flip for training and the centre crop for evaluation
(FGVC, VPT's torchvision pipeline). Training crops are drawn on the host from
the decoded uint8 cache, as a pure function of (seed, step).

Besides a plain TFDS ``ImageSource``, every function here accepts any object
with the methods of ``ExampleSource`` (VTAB tasks with label functions, image
files listed in JSON or text files, image folders: ``vpt_jax.data.sources``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, Optional, Protocol, Union

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vpt_jax.data import local_builders

RESIZE_METHODS = ("tf1_bilinear", "bilinear", "bicubic", "nearest",
                  "antialias_bilinear")
# "antialias_bilinear" widens the bilinear kernel when shrinking, as PIL (and
# so torchvision's Resize, which VPT's FGVC pipeline uses) does.
PREPROCESS_MODES = ("resize", "resize_crop_flip")
# Seeds the crop/flip draws apart from train_batches' permutations ([seed, epoch]).
_CROP_STREAM = 1
# Images decoded per tf.data batch when loading a whole split into memory.
_LOAD_BATCH = 256


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


def resize_images(images, image_size: int, method: str = "tf1_bilinear"):
  """Resizes a uint8 image (H, W, C) or batch (B, H, W, C) to image_size^2.

  Greyscale (C == 1) is tiled to RGB. Returns a uint8 tf.Tensor; an image that
  already has the size is returned unchanged (no resampling).
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"Unknown resize method {method!r}; choose one of {RESIZE_METHODS}")
  images = tf.convert_to_tensor(images)
  if images.shape[-1] == 1:
    images = tf.concat([images] * 3, axis=-1)
  elif images.shape[-1] != 3:
    raise ValueError(f"images must have 1 or 3 channels, got shape {images.shape}")
  batched = images.shape.rank == 4
  if not batched:
    images = images[None]
  height, width = tf.shape(images)[1], tf.shape(images)[2]

  def resample():
    size = [image_size, image_size]
    out = _resample(images, size, method)
    # Bicubic overshoots; round to the nearest grey level.
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

  static_height, static_width = images.shape[1], images.shape[2]
  if static_height is not None and static_width is not None:
    # Known sizes (the usual case for TFDS image features): decide now.
    same = static_height == image_size and static_width == image_size
    out = tf.cast(images, tf.uint8) if same else resample()
  else:
    same = tf.logical_and(tf.equal(height, image_size), tf.equal(width, image_size))
    out = tf.cond(same, lambda: tf.cast(images, tf.uint8), resample)
  out = tf.ensure_shape(out, [None, image_size, image_size, 3])
  return out if batched else out[0]


def _resample(images, size, method: str):
  """float32 resampling of a uint8 batch (B, H, W, C) to size = [h, w]."""
  if method == "tf1_bilinear":
    return tf.compat.v1.image.resize_bilinear(
        images, size, align_corners=False, half_pixel_centers=False)
  if method == "antialias_bilinear":
    return tf.image.resize(images, size, method="bilinear", antialias=True)
  return tf.image.resize(images, size, method=method, antialias=False)


def crop_resize_size(image_size: int) -> int:
  """The shorter side before cropping: 256 for 224, 438 for 384 (VPT's rule)."""
  return image_size * 256 // 224


def resize_shorter_side(image, size: int, method: str = "tf1_bilinear"):
  """Resizes a uint8 image (H, W, C) so that min(H, W) == size, keeping its aspect.

  The longer side becomes int(size * long / short), as torchvision's
  Resize(size) does. Greyscale is tiled to RGB. Returns uint8 (H', W', 3).
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"Unknown resize method {method!r}; choose one of {RESIZE_METHODS}")
  image = tf.convert_to_tensor(image)
  if image.shape[-1] == 1:
    image = tf.concat([image] * 3, axis=-1)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  short = tf.minimum(height, width)
  # Integer arithmetic: int(size * long / short) without float rounding surprises.
  new_height = tf.where(height == short, size, size * height // short)
  new_width = tf.where(width == short, size, size * width // short)

  def resample():
    out = _resample(image[None], tf.stack([new_height, new_width]), method)[0]
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
  same = tf.logical_and(tf.equal(new_height, height), tf.equal(new_width, width))
  out = tf.cond(same, lambda: tf.cast(image, tf.uint8), resample)
  return tf.ensure_shape(out, [None, None, 3])


def center_crop(image, size: int):
  """The central size x size window of (H, W, C), H, W >= size.

  Offsets round((H - size) / 2) like torchvision's CenterCrop (half to even).
  """
  image = tf.convert_to_tensor(image)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  top = tf.cast(tf.round(tf.cast(height - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(width - size, tf.float32) / 2.0), tf.int32)
  return image[top:top + size, left:left + size]


def _builder(source: ImageSource) -> tfds.core.DatasetBuilder:
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
      raise FileNotFoundError(
          f"TFDS dataset {source.builder!r} is not prepared in data_dir={data_dir!r} and "
          f"needs a manual download. Put the files in {manual_dir} as its instructions "
          f"say, then run `tfds build {source.builder} --data_dir={data_dir} "
          f"--manual_dir={manual_dir}`. Instructions:\n"
          f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    else:
      raise FileNotFoundError(
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


def num_examples(source: AnySource) -> int:
  """Examples in ``source.split`` (from the TFDS metadata, no decoding)."""
  if not _is_plain_tfds(source):
    return source.size(0, 1)
  return _builder(source).info.splits[source.split].num_examples


def num_classes(source: AnySource) -> int:
  """Classes of the ClassLabel feature ``source.label_key``."""
  if not _is_plain_tfds(source):
    return source.num_classes()
  feature = _builder(source).info.features[source.label_key]
  if not isinstance(feature, tfds.features.ClassLabel):
    raise TypeError(f"{source.builder!r} feature {source.label_key!r} is "
                    f"{type(feature).__name__}, not a ClassLabel; choose an integer "
                    "class label feature.")
  return feature.num_classes


def class_names(source: AnySource) -> Optional[list[str]]:
  """Names of the label classes, or None when the dataset only numbers them."""
  if not _is_plain_tfds(source):
    return source.class_names()
  feature = _builder(source).info.features[source.label_key]
  names = list(getattr(feature, "names", None) or [])
  if not names or names == [str(i) for i in range(len(names))]:
    return None
  return names


def _examples(source: AnySource, process_index: int,
              process_count: int) -> tf.data.Dataset:
  """This process's share, decoded: {"image": uint8 (H, W, C), "label": int32}."""
  if not _is_plain_tfds(source):
    return source.examples(process_index, process_count)
  builder = _builder(source)
  split = process_split(source.split, process_index, process_count)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return ds.map(lambda example: {"image": example[source.image_key],
                                 "label": tf.cast(example[source.label_key], tf.int32)},
                num_parallel_calls=tf.data.AUTOTUNE)


def _check_modes(resize: str, preprocess: str) -> None:
  if resize not in RESIZE_METHODS:
    raise ValueError(f"Unknown resize method {resize!r}; choose one of {RESIZE_METHODS}")
  if preprocess not in PREPROCESS_MODES:
    raise ValueError(f"Unknown preprocess mode {preprocess!r}; choose one of "
                     f"{PREPROCESS_MODES}")


def _dataset(source: AnySource, *, image_size: int, resize: str,
             preprocess: str = "resize", process_index: int = 0,
             process_count: int = 1, crop: bool = True) -> tf.data.Dataset:
  """tf.data of {"image": uint8, "label": int32 ()} in stored order.

  Images are (S, S, 3) except for "resize_crop_flip" with crop=False (the
  training cache): shorter side ``crop_resize_size(S)``, aspect kept.
  """
  _check_modes(resize, preprocess)
  ds = _examples(source, process_index, process_count)

  def transform(example):
    image = example["image"]
    if preprocess == "resize":
      image = resize_images(image, image_size, resize)
    else:
      image = resize_shorter_side(image, crop_resize_size(image_size), resize)
      if crop:
        image = tf.ensure_shape(center_crop(image, image_size), [image_size, image_size, 3])
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}
  return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)


def load_split_arrays(source: AnySource, *, image_size: int,
                      resize: str = "tf1_bilinear", process_index: int = 0,
                      process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a (small) split once, in TFDS's stored order.

  Args:
    source: the split to read.
    image_size: S; images are resized with ``resize`` unless already S x S.
    resize: one of ``RESIZE_METHODS``.
    process_index, process_count: accepted for symmetry with ``eval_batches``;
      the split is NOT sharded: every process keeps all rows and picks its
      share of each batch with ``train_batches``.

  Returns:
    images uint8 (N, S, S, 3) (greyscale tiled to RGB) and labels int32 (N,).
  """
  del process_index, process_count  # Every process holds the whole split.
  ds = _dataset(source, image_size=image_size, resize=resize)
  images, labels = [], []
  for batch in ds.batch(_LOAD_BATCH).prefetch(1).as_numpy_iterator():
    images.append(batch["image"])
    labels.append(batch["label"])
  if not images:
    raise ValueError(f"split {source.split!r} of {source.builder!r} is empty")
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def train_batches(num_examples: int, *, global_batch: int, seed: int,  # pylint: disable=redefined-outer-name
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[np.ndarray]:
  """Yields this process's rows of each global batch, for steps start_step, ...

  The example order is a pure function of (seed, step): the stream is the
  concatenation of per-epoch permutations, epoch e permuted by
  ``np.random.default_rng([seed, e])``, and step s's global batch is the
  stream's positions [s * B, (s + 1) * B). So every epoch visits each example
  exactly once, resuming at start_step reproduces the same batches without
  replaying, and no example is ever dropped: a global batch may straddle an
  epoch boundary (its rows then come from two permutations; an example can
  appear twice in that one batch).

  Process p takes rows [p * B / P, (p + 1) * B / P) of each global batch, so the
  processes' local batches, concatenated in process order, are the global one.

  Args:
    num_examples: N, the rows of the training arrays.
    global_batch: B, summed over processes.
    seed: the order's seed.
    start_step: first step to yield.
    process_index, process_count: p and P.

  Yields:
    int64 indices (B / P,) into the training arrays; the iterator is infinite.
  """
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"global_batch {global_batch} must be a positive multiple of "
                     f"process_count {process_count}; choose a batch size divisible by "
                     "the number of processes.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  local_batch = global_batch // process_count
  cached_epoch, cached_order = -1, None

  def epoch_order(epoch):
    nonlocal cached_epoch, cached_order
    if epoch != cached_epoch:
      cached_epoch = epoch
      cached_order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return cached_order

  step = start_step
  while True:
    # Only this process's slice of the global batch is materialised.
    start = step * global_batch + process_index * local_batch
    position, pieces, needed = start, [], local_batch
    while needed:
      epoch, offset = divmod(position, num_examples)
      take = min(needed, num_examples - offset)
      pieces.append(epoch_order(epoch)[offset:offset + take])
      position += take
      needed -= take
    yield np.concatenate(pieces).astype(np.int64)
    step += 1


def load_train_set(source: AnySource, *, image_size: int, resize: str = "tf1_bilinear",
                   preprocess: str = "resize"):
  """Decodes a training split once into a uint8 cache for ``train_batch``.

  Returns:
    (images, labels int32 (N,)). For "resize", images is uint8 (N, S, S, 3)
    (``load_split_arrays``); for "resize_crop_flip", a list of N uint8
    (H_i, W_i, 3) arrays with min(H_i, W_i) = ``crop_resize_size(S)``, from
    which ``train_batch`` crops.
  """
  _check_modes(resize, preprocess)
  if preprocess == "resize":
    return load_split_arrays(source, image_size=image_size, resize=resize)
  ds = _dataset(source, image_size=image_size, resize=resize, preprocess=preprocess,
                crop=False)
  images, labels = [], []
  for example in ds.prefetch(8).as_numpy_iterator():
    images.append(example["image"])
    labels.append(example["label"])
  if not images:
    raise ValueError(f"split {source.split!r} of {source.builder!r} is empty")
  return images, np.asarray(labels, np.int32)


def train_batch(images, labels: np.ndarray, indices: np.ndarray, *, image_size: int,
                preprocess: str = "resize", seed: int = 0, step: int = 0,
                process_index: int = 0, process_count: int = 1) -> dict:
  """This process's rows of step ``step``'s batch from a ``load_train_set`` cache.

  For "resize_crop_flip" every row gets a random S x S window (offsets uniform
  over the valid positions, like torchvision's RandomCrop) and a horizontal
  flip with probability 1/2. The draws are made for the whole global batch
  from ``np.random.default_rng([seed, step, 1])`` and each process takes its
  rows, so the augmentation is a pure function of (seed, step) whatever the
  number of processes, and a resumed run sees the same crops.

  Args:
    images, labels: from ``load_train_set``.
    indices: int (B / P,) rows of this process (``train_batches``).
    image_size: S.
    preprocess: as given to ``load_train_set``.
    seed, step: the run's seed and the step of this batch.
    process_index, process_count: p and P.

  Returns:
    {"image": uint8 (B / P, S, S, 3), "label": int32 (B / P,)}.
  """
  if preprocess == "resize":
    return {"image": images[indices], "label": labels[indices]}
  _check_modes("tf1_bilinear", preprocess)
  local = len(indices)
  draws = np.random.default_rng([seed, step, _CROP_STREAM]).random((local * process_count, 3))
  draws = draws[process_index * local:(process_index + 1) * local]
  out = np.empty((local, image_size, image_size, 3), np.uint8)
  for row, (index, (u_top, u_left, u_flip)) in enumerate(zip(indices, draws)):
    image = images[index]
    top = int(u_top * (image.shape[0] - image_size + 1))
    left = int(u_left * (image.shape[1] - image_size + 1))
    window = image[top:top + image_size, left:left + image_size]
    out[row] = window[:, ::-1] if u_flip < 0.5 else window
  return {"image": out, "label": labels[indices]}


def process_split(split: str, process_index: int, process_count: int) -> str:
  """This process's share of ``split`` (tfds.even_splits, no example dropped)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if process_count == 1:
    return split
  return tfds.even_splits(split, process_count, drop_remainder=False)[process_index]


def num_eval_batches(source: AnySource, *, local_batch: int,
                     process_count: int = 1) -> int:
  """Batches each process yields in ``eval_batches``: ceil(max share / batch)."""
  if not _is_plain_tfds(source):
    largest = max(source.size(p, process_count) for p in range(process_count))
  else:
    info = _builder(source).info
    largest = max(info.splits[process_split(source.split, p, process_count)].num_examples
                  for p in range(process_count))
  return math.ceil(largest / local_batch)


def _check_local_batch(local_batch: int) -> None:
  if local_batch < 1:
    raise ValueError(f"local_batch must be >= 1, got {local_batch}")


def eval_dataset(source: AnySource, *, image_size: int, local_batch: int,
                 resize: str = "tf1_bilinear", process_index: int = 0,
                 process_count: int = 1, preprocess: str = "resize") -> tf.data.Dataset:
  """This process's share of a split as tf.data batches, the last one short, unpadded.

  What ``eval_batches`` iterates. Build it once and pass it to every
  evaluation of a run: TensorFlow keeps the functions it traces for each
  pipeline built, so a new pipeline per evaluation grows the process a little
  (about 16 KB) each time.
  """
  _check_local_batch(local_batch)
  ds = _dataset(source, image_size=image_size, resize=resize, preprocess=preprocess,
                process_index=process_index, process_count=process_count)
  return ds.batch(local_batch).prefetch(2)


def eval_batches(source: AnySource, *, image_size: int, local_batch: int,
                 resize: str = "tf1_bilinear", process_index: int = 0,
                 process_count: int = 1, preprocess: str = "resize",
                 dataset: Optional[tf.data.Dataset] = None) -> Iterator[dict]:
  """Streams this process's share of a (possibly large) split, padded.

  The split is divided with tfds.even_splits (shares differ by at most one
  example), read in stored order with tf.data, resized and batched. The last
  real batch is padded with zero images (label 0, mask False), and processes
  with fewer examples get extra all-padding batches, so every process yields
  ``num_eval_batches`` batches and a jitted, mask-weighted eval step runs the
  same number of times everywhere. Each real example appears exactly once
  across processes. With ``preprocess="resize_crop_flip"`` images are the
  centre crops. ``dataset``: ``eval_dataset`` of the same arguments, built
  once for repeated evaluations (default: built here).

  Yields:
    {"image": uint8 (local_batch, S, S, 3), "label": int32 (local_batch,),
     "mask": bool (local_batch,)}.
  """
  _check_local_batch(local_batch)
  if dataset is None:
    dataset = eval_dataset(source, image_size=image_size, local_batch=local_batch,
                           resize=resize, process_index=process_index,
                           process_count=process_count, preprocess=preprocess)
  total = num_eval_batches(source, local_batch=local_batch, process_count=process_count)
  emitted = 0
  for batch in dataset.as_numpy_iterator():
    real = len(batch["label"])
    pad = local_batch - real
    mask = np.arange(local_batch) < real
    image, label = batch["image"], batch["label"]
    if pad:
      image = np.concatenate([image, np.zeros((pad,) + image.shape[1:], np.uint8)])
      label = np.concatenate([label, np.zeros((pad,), label.dtype)])
    yield {"image": image, "label": label.astype(np.int32), "mask": mask}
    emitted += 1
  if emitted > total:
    raise RuntimeError(f"{source.builder!r} split {source.split!r} gave {emitted} batches, "
                       f"more than the {total} its metadata implies; rebuild the dataset.")
  for _ in range(total - emitted):
    yield {"image": np.zeros((local_batch, image_size, image_size, 3), np.uint8),
           "label": np.zeros((local_batch,), np.int32),
           "mask": np.zeros((local_batch,), bool)}
