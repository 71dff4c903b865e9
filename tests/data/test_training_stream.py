"""The training stream: batch order, the decoded cache, crops and flips, through the
trainer."""

import itertools

import numpy as np
import pytest

import data_fixtures
from vpt_jax.data import source_protocols
from vpt_jax.data import training_stream

_write_image = data_fixtures.write_image


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


# ----------------------------------------------------------------- train_batches

def test_train_batches_resume_equals_uninterrupted():
  full = _take(training_stream.train_batches(10, global_batch=4, seed=3), 20)
  resumed = _take(training_stream.train_batches(10, global_batch=4, seed=3, start_step=7), 13)
  assert len(resumed) == 13  # the stream is infinite: zip below compares all 13 steps
  for a, b in zip(full[7:], resumed):
    np.testing.assert_array_equal(a, b)
  other_seed = _take(training_stream.train_batches(10, global_batch=4, seed=4), 20)
  assert not all(np.array_equal(a, b) for a, b in zip(full, other_seed))


def test_train_batches_each_epoch_covers_every_example_once():
  num, batch = 10, 4  # Batches straddle epoch boundaries.
  stream = np.concatenate(_take(training_stream.train_batches(num, global_batch=batch, seed=0), 15))
  assert stream.dtype == np.int64
  for epoch in range(len(stream) // num):
    np.testing.assert_array_equal(np.sort(stream[epoch * num:(epoch + 1) * num]),
                                  np.arange(num))
  # Different epochs use different permutations.
  assert not np.array_equal(stream[:num], stream[num:2 * num])


def test_train_batches_processes_concatenate_to_the_global_batch():
  global_batches = _take(training_stream.train_batches(10, global_batch=6, seed=1, start_step=2), 8)
  parts = [_take(training_stream.train_batches(10, global_batch=6, seed=1, start_step=2,
                                               process_index=p, process_count=2), 8)
           for p in range(2)]
  for step, global_batch in enumerate(global_batches):
    assert parts[0][step].shape == (3,)
    np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]),
                                  global_batch)


def test_train_batches_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match="multiple of process_count"):
    next(training_stream.train_batches(10, global_batch=5, seed=0, process_count=2))


# ----------------------------------------------------------------- the decoded cache

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return data_fixtures.prepared_tfds_dir(tmp_path_factory)


def test_load_split_arrays_resizes_and_counts(data_dir):
  source = source_protocols.ImageSource("vpt_sprites/tiny", "train[:10]+validation", data_dir,
                                        label_key="count")
  images, labels = training_stream.load_split_arrays(source, image_size=24, resize="bilinear")
  assert images.shape == (18, 24, 24, 3) and images.dtype == np.uint8
  assert labels.shape == (18,) and labels.dtype == np.int32
  same, _ = training_stream.load_split_arrays(source, image_size=32)
  assert same.shape == (18, 32, 32, 3)


# ----------------------------------------------------------------- crops and flips

def _ragged_cache():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, size=(8, 8 + i, 3), dtype=np.uint8) for i in range(6)]
  return images, np.arange(6, dtype=np.int32)


def test_crop_flip_is_a_function_of_seed_and_step():
  images, labels = _ragged_cache()
  indices = np.array([0, 5, 2, 2])
  kwargs = dict(image_size=7, preprocess="resize_crop_flip", seed=3)
  a = training_stream.train_batch(images, labels, indices, step=4, **kwargs)
  b = training_stream.train_batch(images, labels, indices, step=4, **kwargs)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == (4, 7, 7, 3) and a["label"].tolist() == [0, 5, 2, 2]
  others = [training_stream.train_batch(images, labels, indices, step=s, **kwargs)["image"]
            for s in range(5, 9)]
  assert not all(np.array_equal(a["image"], o) for o in others)
  # Every row is a (possibly flipped) 7 x 7 window of its image.
  for row, index in zip(a["image"], indices):
    image = images[index]
    windows = [image[t:t + 7, l:l + 7] for t, l in itertools.product(
        range(image.shape[0] - 6), range(image.shape[1] - 6))]
    assert any(np.array_equal(row, w) or np.array_equal(row, w[:, ::-1]) for w in windows)
  # Two processes' rows are the one-process batch's rows.
  halves = [training_stream.train_batch(images, labels, indices[2 * p:2 * p + 2], step=4,
                                        process_index=p, process_count=2, **kwargs)["image"]
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), a["image"])


def test_both_flips_and_many_offsets_occur():
  images, labels = _ragged_cache()
  flips, offsets = set(), set()
  for step in range(40):
    row = training_stream.train_batch(images, labels, np.array([5]), image_size=7,
                                      preprocess="resize_crop_flip", seed=0, step=step)["image"][0]
    for left in range(images[5].shape[1] - 6):
      for top in range(2):
        window = images[5][top:top + 7, left:left + 7]
        if np.array_equal(row, window):
          flips.add(False), offsets.add((top, left))
        if np.array_equal(row, window[:, ::-1]):
          flips.add(True), offsets.add((top, left))
  assert flips == {False, True} and len(offsets) > 5


# ----------------------------------------------------------------- through the trainer

def test_trainer_reads_a_folder_with_fgvc_augmentation(tmp_path):
  from configs import fgvc as fgvc_config  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import config_checks  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import feature_cache  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import inputs  # pylint: disable=g-import-not-at-top
  root = tmp_path / "flowers"
  for cls in ("daisy", "rose", "tulip"):
    for i in range(3):
      _write_image(str(root / "train" / cls / f"{i}.png"), 25 * i, size=(12, 10))
  config = fgvc_config.get_config("dataset=cub,runlocal")
  config.unlock()
  config.data.task, config.data.path = "folder", str(root)
  config.model.variant, config.model.image_size = "test/4", 8
  config.model.init_checkpoint, config.model.from_scratch = "", True
  config.optim.batch_size = 4
  config.lock()
  config_checks.validate_config(config)
  data = inputs.load_train_data(config)
  assert data.num_classes == 3 and data.class_names == ["daisy", "rose", "tulip"]
  # Shorter side 8 * 256 // 224 = 9: (12, 10) -> (10, 9).
  assert len(data.images) == 9 and data.images[0].shape == (10, 9, 3)
  first, second = inputs.batches(data, config, 0), inputs.batches(data, config, 1)
  next(first)
  np.testing.assert_array_equal(next(first)["image"], next(second)["image"])  # resume
  batch = next(inputs.batches(data, config, 5))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["label"].dtype == np.int32
  assert not feature_cache.uses_cached_features(config, {"head": {"kernel": "train"}})
