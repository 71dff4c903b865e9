"""What a run reads: the decoded training split, its batches and the evaluation streams.

The training split is small (VTAB-1k, FGVC): it is decoded once and kept as
uint8; every process holds all of it and picks its rows of each batch. The
batch order (and any crop or flip) is a function of (seed, step), so a
resumed run, or a setting of a sweep, draws the batches of an uninterrupted
separate run.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import jax
import numpy as np

from vpt_jax.data import source_protocols
from vpt_jax.data import sources
from vpt_jax.data import training_stream
from vpt_jax.training import config_checks


def source(config, split: str) -> source_protocols.AnySource:
  """The split of config.data (a TFDS dataset, a VTAB/FGVC task or image files)."""
  return sources.make_source(config.data, split)


@dataclasses.dataclass
class TrainData:
  """The (small) training split, decoded once and kept as uint8."""
  # uint8 (N, S, S, 3), or for data.preprocess="resize_crop_flip" a list of N
  # uint8 (H, W, 3) with shorter side 256/224 * S (training_stream.load_train_set).
  images: np.ndarray
  labels: np.ndarray  # (N,) int32
  num_classes: int
  class_names: Optional[list]


def load_train_data(config) -> TrainData:
  """Decodes the training split and checks the labels against the classes."""
  train_source = source(config, config.data.train_split)
  meta_classes = source_protocols.num_classes(train_source)
  num_classes = config.data.num_classes or meta_classes
  if config.data.num_classes and meta_classes and config.data.num_classes != meta_classes:
    raise config_checks.ConfigError(
        f"config.data.num_classes={config.data.num_classes} but {train_source.builder} "
        f"(label {config.data.label_key!r}) has {meta_classes} classes; set "
        f"--config.data.num_classes={meta_classes} (or 0 to take it from the dataset)")
  # Every process keeps the whole split; train_batch picks its rows.
  images, labels = training_stream.load_train_set(
      train_source, image_size=config.model.image_size, resize=config.data.resize,
      preprocess=config.data.preprocess)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise config_checks.ConfigError(
        f"training labels span [{labels.min()}, {labels.max()}] but the model has "
        f"{num_classes} classes; fix data.num_classes")
  return TrainData(images, labels, num_classes, source_protocols.class_names(train_source))


def batches(data: TrainData, config, start_step: int,
            features: Optional[np.ndarray] = None) -> Iterator[dict]:
  """This process's training batches from ``start_step`` on, as every run draws them.

  Images, or the cached ``features`` (N, D) if given; the order (and any crop
  or flip) is a function of (seed, step), so a resumed or fused run gets the
  batches of an uninterrupted separate one.
  """
  for step, indices in enumerate(training_stream.train_batches(
      len(data.labels), global_batch=config.optim.batch_size, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count()), start_step):
    if features is not None:
      yield {"features": features[indices], "label": data.labels[indices]}
    else:  # crops and flips (data.preprocess) are a function of (seed, step)
      yield training_stream.train_batch(
          data.images, data.labels, indices, image_size=config.model.image_size,
          preprocess=config.data.preprocess, seed=config.seed, step=step,
          process_index=jax.process_index(), process_count=jax.process_count())


def eval_stream_options(config) -> dict:
  """This process's keyword arguments of ``eval_stream.eval_dataset``/``eval_batches``."""
  return dict(image_size=config.model.image_size,
              local_batch=config.eval.batch_size // jax.process_count(),
              resize=config.data.resize, process_index=jax.process_index(),
              process_count=jax.process_count(), preprocess=config.data.preprocess)
