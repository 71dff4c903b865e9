"""Tests of the input pipeline: batch order, eval padding, resizing, normalising."""

import hashlib
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vpt_jax.data import eval_stream
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.data import preprocessing
from vpt_jax.data import source_protocols
from vpt_jax.data import training_stream


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


# ------------------------------------------------------------------ train_batches

def test_train_batches_resume_equals_uninterrupted():
  full = _take(training_stream.train_batches(10, global_batch=4, seed=3), 20)
  resumed = _take(training_stream.train_batches(10, global_batch=4, seed=3, start_step=7), 13)
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


# ------------------------------------------------------------------ eval_batches

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("vpt_sprites/tiny", data_dir=path).download_and_prepare()
  return path


def _digest(image):
  return hashlib.sha1(image.tobytes()).hexdigest()


def test_eval_batches_pad_and_mask(data_dir):
  # 10 test examples in batches of 4: 4 + 4 + 2 real rows.
  source = source_protocols.ImageSource("vpt_sprites/tiny", "test", data_dir, label_key="count")
  batches = list(eval_stream.eval_batches(source, image_size=16, local_batch=4))
  assert len(batches) == 3
  for batch in batches:
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert batch["mask"].dtype == bool
  assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2]
  assert not batches[-1]["image"][2:].any()
  # The real rows are the split's examples, once each, in stored order.
  images, labels = training_stream.load_split_arrays(source, image_size=16)
  real = np.concatenate([b["image"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(real, images)
  np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]),
                                labels)


def test_a_reused_eval_dataset_streams_the_split_every_time(data_dir):
  # A run builds its evaluation pipeline once and iterates it at every evaluation.
  source = source_protocols.ImageSource("vpt_sprites/tiny", "test", data_dir, label_key="count")
  images, labels = training_stream.load_split_arrays(source, image_size=16)
  dataset = eval_stream.eval_dataset(source, image_size=16, local_batch=4)
  for _ in range(3):
    batches = list(eval_stream.eval_batches(source, image_size=16, local_batch=4, dataset=dataset))
    assert [int(b["mask"].sum()) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in batches]),
                                  images)
    np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]),
                                  labels)


def test_eval_batches_two_processes(data_dir):
  # 7 examples over 2 processes: shares of 4 and 3; batches of 3 -> 2 batches each.
  source = source_protocols.ImageSource("vpt_sprites/tiny", "train[:7]", data_dir, label_key="shape")
  per_process = [list(eval_stream.eval_batches(source, image_size=32, local_batch=3,
                                             process_index=p, process_count=2))
                 for p in range(2)]
  assert [len(b) for b in per_process] == [2, 2]
  assert eval_stream.num_eval_batches(source, local_batch=3, process_count=2) == 2
  masks = [[int(b["mask"].sum()) for b in batches] for batches in per_process]
  assert masks == [[3, 1], [3, 0]]
  seen = [_digest(b["image"][i]) for batches in per_process for b in batches
          for i in np.nonzero(b["mask"])[0]]
  images, _ = training_stream.load_split_arrays(source, image_size=32)
  assert len(seen) == 7 and sorted(seen) == sorted(_digest(im) for im in images)


def test_load_split_arrays_resizes_and_counts(data_dir):
  source = source_protocols.ImageSource("vpt_sprites/tiny", "train[:10]+validation", data_dir,
                                        label_key="count")
  images, labels = training_stream.load_split_arrays(source, image_size=24, resize="bilinear")
  assert images.shape == (18, 24, 24, 3) and images.dtype == np.uint8
  assert labels.shape == (18,) and labels.dtype == np.int32
  same, _ = training_stream.load_split_arrays(source, image_size=32)
  assert same.shape == (18, 32, 32, 3)


def test_unprepared_remote_dataset_error_names_the_fix(tmp_path):
  source = source_protocols.ImageSource("mnist", "train", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not prepared"):
    source_protocols.num_examples(source)


# ------------------------------------------------------------------ resizing

def test_tf1_bilinear_2x2_to_4x4_by_hand():
  # Output pixel o samples input coordinate o * 2 / 4 = 0, 0.5, 1, 1.5; the
  # upper neighbour is clamped to the last row/column.
  image = np.array([[0, 100], [200, 40]], np.uint8)[..., None]
  # Along x: row 0 -> [0, 50, 100, 100]; row 1 -> [200, 120, 40, 40].
  # Along y: rows 0, (row0 + row1) / 2, row1, row1.
  expected = np.array([[0, 50, 100, 100],
                       [100, 85, 70, 70],
                       [200, 120, 40, 40],
                       [200, 120, 40, 40]], np.uint8)
  out = preprocessing.resize_images(image, 4, "tf1_bilinear").numpy()
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8
  for channel in range(3):  # Greyscale is tiled to RGB.
    np.testing.assert_array_equal(out[..., channel], expected)


def test_tf1_bilinear_3x3_to_2x2_by_hand():
  # Output pixel o samples o * 3 / 2 = 0 and 1.5: index 0, and halfway 1..2.
  image = np.array([[0, 10, 20], [30, 40, 50], [60, 70, 80]], np.uint8)
  image = np.stack([image, image + 1, image + 2], axis=-1)
  # Along x: rows -> [0, 15], [30, 45], [60, 75]; along y: row 0 and (row1 + row2) / 2.
  expected = np.array([[0, 15], [45, 60]], np.uint8)
  out = preprocessing.resize_images(image[None], 2, "tf1_bilinear").numpy()
  assert out.shape == (1, 2, 2, 3)
  for channel in range(3):
    np.testing.assert_array_equal(out[0, ..., channel], expected + channel)


def test_half_pixel_bilinear_differs_from_legacy():
  # TF2 bilinear samples (o + 0.5) * 3 / 2 - 0.5 = 0.25 and 1.75 instead.
  image = np.array([[0, 10, 20], [30, 40, 50], [60, 70, 80]], np.uint8)[..., None]
  out = preprocessing.resize_images(image, 2, "bilinear").numpy()[..., 0]
  # x: 0.25 -> 2.5, 1.75 -> 17.5 on row 0; y likewise (30 per row) -> +7.5 / +52.5.
  np.testing.assert_array_equal(out, np.round(np.array([[10.0, 25.0], [55.0, 70.0]])))


def test_same_size_is_not_resampled():
  image = np.random.default_rng(0).integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
  for method in preprocessing.RESIZE_METHODS:
    np.testing.assert_array_equal(preprocessing.resize_images(image, 5, method).numpy(), image)


def test_unknown_resize_method():
  with pytest.raises(ValueError, match="tf1_bilinear"):
    preprocessing.resize_images(np.zeros((4, 4, 3), np.uint8), 2, "lanczos")


# ------------------------------------------------------------------ normalising

def test_normalize_images_by_hand():
  images = np.array([[0, 255, 51]], np.uint8)  # one pixel, three channels
  out = normalization_lib.normalize_images(images, *normalization_lib.MINUS_ONE_TO_ONE)
  assert out.dtype == np.float32
  np.testing.assert_allclose(np.asarray(out), [[-1.0, 1.0, -0.6]], atol=1e-6)
  out = normalization_lib.normalize_images(images, normalization_lib.IMAGENET_MEAN,
                                           normalization_lib.IMAGENET_STD)
  np.testing.assert_allclose(
      np.asarray(out),
      [[-0.485 / 0.229, (1.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]], rtol=1e-5)


def test_normalization_imports_no_tensorflow():
  """Models, exports and benchmarks normalise without loading TensorFlow (its
  import would raise the benchmarks' peak-RSS figures)."""
  code = ("import sys; import vpt_jax.data.normalization; "
          "assert 'tensorflow' not in sys.modules")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)
