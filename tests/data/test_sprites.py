"""Tests of the procedural sprite generator."""

import numpy as np
import pytest
from scipy import ndimage

from vpt_jax.data import sprites


def test_deterministic_given_seed():
  a = sprites.generate(40, seed=3, max_objects=4)
  b = sprites.generate(40, seed=3, max_objects=4)
  c = sprites.generate(40, seed=4, max_objects=4)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert not np.array_equal(a["image"], c["image"])


def test_chunk_size_does_not_change_the_data():
  a = sprites.generate(30, seed=5, max_objects=3, chunk_size=7)
  b = sprites.generate(30, seed=5, max_objects=3, chunk_size=512)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_shapes_dtypes_and_label_ranges():
  kwargs = dict(min_objects=1, max_objects=6, image_size=24)
  data = sprites.generate(200, seed=0, **kwargs)
  classes = sprites.attribute_num_classes(min_objects=1, max_objects=6)
  assert data["image"].shape == (200, 24, 24, 3)
  assert data["image"].dtype == np.uint8
  for name in sprites.ATTRIBUTES:
    assert data[name].dtype == np.int64, name
    assert data[name].shape == (200,), name
    assert data[name].min() >= 0 and data[name].max() < classes[name], name
  # Every count from 1 to 6 sprites occurs.
  assert set(data["count"]) == set(range(6))
  np.testing.assert_array_equal(
      data["shape_color"], data["shape"] * len(sprites.COLOR_NAMES) + data["color"])
  # Slot 0 is the largest sprite and holds the image-level attributes.
  radii = data["objects/radius"]
  assert np.all(radii[:, :1] >= radii)
  np.testing.assert_array_equal(data["objects/shape"][:, 0], data["shape"])


def _foreground(image, threshold=80):
  """Pixels clearly brighter than the dark background (max channel)."""
  return image.max(axis=-1) > threshold


def test_position_bins_match_the_pixels():
  data = sprites.generate(300, seed=1, image_size=32, num_position_bins=8)
  margin = 0.22 * 32  # default max_scale for single sprites
  width = (32 - 2 * margin) / 8
  for i in range(300):
    ys, xs = np.nonzero(_foreground(data["image"][i]))
    assert xs.size > 0
    # Pixel centres are at +0.5; the centroid of a symmetric shape is its
    # centre, up to anti-aliasing and the heart's/triangle's asymmetry.
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    expected_x = np.clip(np.floor((cx - margin) / width), 0, 7)
    expected_y = np.clip(np.floor((cy - margin) / width), 0, 7)
    if data["shape"][i] in (0, 1, 3):  # point-symmetric shapes: exact centroid
      assert abs(expected_x - data["x_bin"][i]) <= (0 if _far_from_edge(cx, margin, width) else 1)
      assert abs(expected_y - data["y_bin"][i]) <= (0 if _far_from_edge(cy, margin, width) else 1)
    else:
      assert abs(expected_x - data["x_bin"][i]) <= 1
      assert abs(expected_y - data["y_bin"][i]) <= 1


def _far_from_edge(centre, margin, width, tolerance=0.35):
  """Whether a centroid is clearly inside its bin (not within tolerance px of an edge)."""
  offset = (centre - margin) / width
  return abs(offset - np.round(offset)) * width > tolerance


def test_hand_made_scene_left_and_right():
  """Two scenes whose only sprite sits far left / far right."""
  data = sprites.generate(400, seed=2, image_size=32)
  left = np.nonzero(data["x_bin"] == 0)[0][0]
  right = np.nonzero(data["x_bin"] == 7)[0][0]
  _, xs_left = np.nonzero(_foreground(data["image"][left]))
  _, xs_right = np.nonzero(_foreground(data["image"][right]))
  assert xs_left.mean() < 11 and xs_right.mean() > 21
  # The other half of the image is background.
  assert not _foreground(data["image"][left])[:, 20:].any()
  assert not _foreground(data["image"][right])[:, :12].any()


def test_orientation_bins_respect_symmetry():
  data = sprites.generate(500, seed=6, num_orientation_bins=8)
  angle = data["objects/angle"][:, 0]
  symmetry = np.asarray(sprites.SYMMETRY_DEGREES)[data["shape"]]
  expected = np.floor(np.mod(angle, symmetry) / symmetry * 8)
  np.testing.assert_array_equal(np.minimum(expected, 7), data["orientation_bin"])


@pytest.mark.parametrize("shape", range(len(sprites.SHAPES)))
def test_symmetry_turns_leave_the_image_unchanged(shape):
  """Turning a sprite by its symmetry angle draws the same pixels; other turns don't."""
  symmetry = sprites.SYMMETRY_DEGREES[shape]

  def draw(angle_deg):
    return sprites._rasterise(  # pylint: disable=protected-access
        centres=np.array([[[16.0, 16.0]]]), radii=np.array([[10.0]]),
        angles=np.radians(np.array([[angle_deg]])), shapes=np.array([[shape]]),
        colors=np.array([[[255.0, 255.0, 255.0]]]), present=np.array([[True]]),
        backgrounds=np.zeros((1, 32, 32, 3), np.float32), image_size=32, supersample=4)

  base = draw(17.0)
  np.testing.assert_allclose(draw(17.0 + symmetry), base, atol=2.0)
  assert np.abs(draw(17.0 + symmetry / 4) - base).max() > 50


def test_rotation_turns_the_ellipse():
  """An ellipse at bin 0 (angle near 0) is wider than tall; near 90 degrees taller."""
  data = sprites.generate(2000, seed=7, min_scale=0.2, max_scale=0.22)
  ellipses = data["shape"] == 1
  angle = np.mod(data["objects/angle"][:, 0], 180.0)
  flat = np.nonzero(ellipses & ((angle < 5) | (angle > 175)))[0]
  upright = np.nonzero(ellipses & (np.abs(angle - 90) < 5))[0]
  assert flat.size and upright.size
  for i, wide in [(flat[0], True), (upright[0], False)]:
    ys, xs = np.nonzero(_foreground(data["image"][i]))
    extent_x, extent_y = np.ptp(xs), np.ptp(ys)
    assert (extent_x > extent_y + 2) == wide, (extent_x, extent_y)


def test_count_equals_connected_components():
  data = sprites.generate(200, seed=8, image_size=32, min_objects=1, max_objects=6)
  agree = 0
  for i in range(200):
    _, components = ndimage.label(_foreground(data["image"][i], threshold=60))
    agree += components == data["count"][i] + 1
  # Sprites never overlap; a rare dim sprite may fall under the threshold.
  assert agree >= 190


def test_sprites_do_not_overlap():
  data = sprites.generate(300, seed=9, max_objects=6)
  x, y, r = data["objects/x"], data["objects/y"], data["objects/radius"]
  present = data["objects/shape"] >= 0
  for i in range(300):
    idx = np.nonzero(present[i])[0]
    for a in idx:
      for b in idx[idx > a]:
        distance = np.hypot(x[i, a] - x[i, b], y[i, a] - y[i, b])
        assert distance >= r[i, a] + r[i, b] + sprites.OBJECT_GAP - 1e-4


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="min_objects"):
    sprites.generate(2, seed=0, min_objects=3, max_objects=2)
  with pytest.raises(ValueError, match="max_scale"):
    sprites.generate(2, seed=0, min_scale=0.3, max_scale=0.6)
