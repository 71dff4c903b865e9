"""Resizing (the VTAB reference's TF1 bilinear and others), shorter-side resize and
centre crop (FGVC)."""

import numpy as np
import pytest

from vpt_jax.data import preprocessing


# ----------------------------------------------------------------- resizing

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


def test_antialias_resize_smooths_when_shrinking():
  stripes = np.zeros((8, 8, 3), np.uint8)
  stripes[:, ::2] = 255
  plain = preprocessing.resize_images(stripes, 4, "tf1_bilinear").numpy()
  smooth = preprocessing.resize_images(stripes, 4, "antialias_bilinear").numpy()
  assert plain.min() == 255  # samples only the white columns: aliasing
  assert 100 < smooth.mean() < 155


# ----------------------------------------------------------------- FGVC preprocessing

def test_shorter_side_and_centre_crop_like_torchvision():
  image = np.arange(16 * 32 * 3, dtype=np.int64).reshape(16, 32, 3) % 251
  image = image.astype(np.uint8)
  resized = preprocessing.resize_shorter_side(image, 8, "tf1_bilinear").numpy()
  # Exactly 2x smaller: TF1 bilinear samples input pixel 2 * o.
  np.testing.assert_array_equal(resized, image[::2, ::2])
  assert preprocessing.resize_shorter_side(np.zeros((10, 15, 3), np.uint8), 8).shape == (8, 12, 3)
  assert preprocessing.resize_shorter_side(np.zeros((15, 10, 1), np.uint8), 8).shape == (12, 8, 3)
  # Centre 7 x 7 of 8 x 16: top round(0.5) = 0 (half to even), left round(4.5) = 4.
  np.testing.assert_array_equal(preprocessing.center_crop(resized, 7).numpy(),
                                resized[0:7, 4:11])
  assert preprocessing.crop_resize_size(224) == 256 and preprocessing.crop_resize_size(384) == 438
