"""The evaluation stream: a split read in stored order, in padded, masked batches.

Evaluation splits can be large, so ``eval_batches`` streams them with tf.data,
one share per process, padded so every process runs the same number of steps
(the big_vision ``make_for_inference`` convention: padding rows are zero
images with ``mask=False``).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from vpt_jax.data import files
from vpt_jax.data import preprocessing
from vpt_jax.data import source_protocols


def num_eval_batches(source: source_protocols.AnySource, *, local_batch: int,
                     process_count: int = 1) -> int:
  """Batches each process yields in ``eval_batches``: ceil(max share / batch)."""
  largest = max(source_protocols.share_size(source, p, process_count)
                for p in range(process_count))
  return math.ceil(largest / local_batch)


def _check_local_batch(local_batch: int) -> None:
  if local_batch < 1:
    raise ValueError(f"local_batch must be >= 1, got {local_batch}")


def eval_dataset(source: source_protocols.AnySource, *, image_size: int, local_batch: int,
                 resize: str = "tf1_bilinear", process_index: int = 0,
                 process_count: int = 1, preprocess: str = "resize") -> tf.data.Dataset:
  """This process's share of a split as tf.data batches, the last one short, unpadded.

  What ``eval_batches`` iterates. Build it once and pass it to every
  evaluation of a run: TensorFlow keeps the functions it traces for each
  pipeline built, so a new pipeline per evaluation grows the process a little
  (about 16 KB) each time.
  """
  _check_local_batch(local_batch)
  ds = preprocessing.preprocessed_examples(
      source, image_size=image_size, resize=resize, preprocess=preprocess,
      process_index=process_index, process_count=process_count)
  return ds.batch(local_batch).prefetch(2)


def eval_batches(source: source_protocols.AnySource, *, image_size: int, local_batch: int,
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
  for batch in files.numpy_batches(dataset):
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
