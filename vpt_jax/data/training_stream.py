"""The training stream: a split decoded once into memory, batches drawn from it.

Training sets in VTAB-1k are small (1,000 images), so a training split is
decoded once into numpy (``load_train_set``) and batches are index arrays into
it (``train_batches``), a pure function of (seed, step): resuming needs no
data-loader state. With "resize_crop_flip" (``preprocessing``), training crops
and flips are drawn on the host from the decoded uint8 cache (``train_batch``),
also as a pure function of (seed, step).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from vpt_jax import errors
from vpt_jax.data import files
from vpt_jax.data import preprocessing
from vpt_jax.data import source_protocols

# Seeds the crop/flip draws apart from train_batches' permutations ([seed, epoch]).
_CROP_STREAM = 1
# Images decoded per tf.data batch when loading a whole split into memory.
_LOAD_BATCH = 256


def _check_not_empty(images: list, source: source_protocols.AnySource) -> None:
  if not images:
    raise errors.UserError(f"split {source.split!r} of {source.builder!r} is empty")


def load_split_arrays(source: source_protocols.AnySource, *, image_size: int,
                      resize: str = "tf1_bilinear", process_index: int = 0,
                      process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a (small) split once, in TFDS's stored order.

  Args:
    source: the split to read.
    image_size: S; images are resized with ``resize`` unless already S x S.
    resize: one of ``preprocessing.RESIZE_METHODS``.
    process_index, process_count: accepted for symmetry with
      ``eval_stream.eval_batches``; the split is NOT sharded: every process
      keeps all rows and picks its share of each batch with ``train_batches``.

  Returns:
    images uint8 (N, S, S, 3) (greyscale tiled to RGB) and labels int32 (N,).
  """
  del process_index, process_count  # Every process holds the whole split.
  ds = preprocessing.preprocessed_examples(source, image_size=image_size, resize=resize)
  images, labels = [], []
  for batch in files.numpy_batches(ds.batch(_LOAD_BATCH).prefetch(1)):
    images.append(batch["image"])
    labels.append(batch["label"])
  _check_not_empty(images, source)
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def train_batches(num_examples: int, *, global_batch: int, seed: int,
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


def load_train_set(source: source_protocols.AnySource, *, image_size: int,
                   resize: str = "tf1_bilinear", preprocess: str = "resize"):
  """Decodes a training split once into a uint8 cache for ``train_batch``.

  Returns:
    (images, labels int32 (N,)). For "resize", images is uint8 (N, S, S, 3)
    (``load_split_arrays``); for "resize_crop_flip", a list of N uint8
    (H_i, W_i, 3) arrays with min(H_i, W_i) =
    ``preprocessing.crop_resize_size(S)``, from which ``train_batch`` crops.
  """
  preprocessing.check_modes(resize, preprocess)
  if preprocess == "resize":
    return load_split_arrays(source, image_size=image_size, resize=resize)
  ds = preprocessing.preprocessed_examples(source, image_size=image_size, resize=resize,
                                          preprocess=preprocess, crop=False)
  images, labels = [], []
  for example in files.numpy_batches(ds.prefetch(8)):
    images.append(example["image"])
    labels.append(example["label"])
  _check_not_empty(images, source)
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
  preprocessing.check_modes("tf1_bilinear", preprocess)
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
