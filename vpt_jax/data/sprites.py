"""Procedural VTAB-Structured-style sprite scenes (pure NumPy, deterministic).

Each image is S x S x 3 uint8: a dark, slightly noisy background with one or
several non-overlapping sprites. Every sprite has a shape (square, ellipse,
triangle, cross, heart), a palette colour, a radius, a rotation and a centre.
Labels describe the scene the way dSprites (position, orientation, scale) and
CLEVR (count, distance) tasks do, so held-out structured tasks can be posed on
data made offline.

Geometry conventions (all in pixels, image x to the right, y downwards):

* Every shape is drawn inside the circle of radius ``radius`` around its
  centre (its bounding circle), so two sprites whose bounding circles are
  apart by ``OBJECT_GAP`` never touch: counting is well defined.
* Centres lie in the square [margin, S - margin]^2 with
  ``margin = max_scale * S`` (the largest possible radius), the same for all
  sprites, so the position bins map to fixed pixel ranges whatever the sprite
  size: ``x_bin = floor((x - margin) / (S - 2 margin) * num_position_bins)``.
* The rotation angle is drawn uniformly in [0, 360) degrees, and
  ``orientation_bin`` bins the angle modulo the shape's rotational symmetry
  (90 degrees for square and cross, 180 for the ellipse, 120 for the
  triangle, 360 for the heart), so images that look the same get the same bin.

Edges are anti-aliased by supersampling; the rasteriser is vectorised over
images and pixels (one pass per object slot and shape), so thousands of 32 px
images per second come out of one core.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

SHAPES = ("square", "ellipse", "triangle", "cross", "heart")
# Rotational symmetry of each shape in degrees: rotations by this angle leave
# the sprite unchanged, so orientation is only defined modulo it.
SYMMETRY_DEGREES = (90.0, 180.0, 120.0, 90.0, 360.0)
COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
PALETTE = np.array([
    (235, 55, 50), (55, 205, 75), (60, 110, 245),
    (240, 220, 55), (225, 70, 225), (65, 220, 230)], dtype=np.float32)
# Minimum free space between the bounding circles of two sprites, in pixels.
OBJECT_GAP = 1.0
# Placement tries this many random centres per sprite and keeps the freest one.
_PLACEMENT_CANDIDATES = 48
# The heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3 has its area centroid at
# y = 0.2935 and reaches 1.2935 from it (the bottom tip); these map the unit
# bounding circle onto it.
_HEART_CENTER_Y = 0.2935
_HEART_RADIUS = 1.2935

# The label attributes every image gets (int64 arrays of shape (N,)).
ATTRIBUTES = ("shape", "color", "scale_bin", "orientation_bin", "x_bin", "y_bin",
              "count", "lowest_y_bin", "shape_color")


def default_scale_range(max_objects: int) -> tuple[float, float]:
  """Radius range as a fraction of the image size: smaller sprites for crowds."""
  return (0.10, 0.22) if max_objects <= 1 else (0.07, 0.13)


def attribute_num_classes(*, min_objects: int = 1, max_objects: int = 1,
                          num_scale_bins: int = 4, num_orientation_bins: int = 8,
                          num_position_bins: int = 8) -> dict[str, int]:
  """Number of classes of each label attribute, for ClassLabel features.

  ``count`` is ``num_objects - 1`` so a label means the same number of sprites
  in every configuration; it has ``max_objects`` classes (those below
  ``min_objects - 1`` just never occur).
  """
  del min_objects  # Counts are absolute; see above.
  return {
      "shape": len(SHAPES),
      "color": len(COLOR_NAMES),
      "scale_bin": num_scale_bins,
      "orientation_bin": num_orientation_bins,
      "x_bin": num_position_bins,
      "y_bin": num_position_bins,
      "count": max_objects,
      "lowest_y_bin": num_position_bins,
      "shape_color": len(SHAPES) * len(COLOR_NAMES),
  }


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Membership of points (u, v) in the unit-bounding-circle shape (bool)."""
  if shape == 0:  # Square with its corners on the unit circle.
    return np.maximum(np.abs(u), np.abs(v)) <= 1.0 / math.sqrt(2.0)
  if shape == 1:  # Ellipse 2:1, long axis along u at angle 0.
    return u * u + 4.0 * v * v <= 1.0
  if shape == 2:  # Equilateral triangle inscribed in the unit circle, apex up.
    # Edge normals point down, and 30 degrees below the horizontals; the
    # inradius of a triangle with circumradius 1 is 1/2.
    inside = v <= 0.5
    for angle in (math.radians(-30.0), math.radians(210.0)):
      inside &= u * math.cos(angle) + v * math.sin(angle) <= 0.5
    return inside
  if shape == 3:  # Plus-shaped cross, arm half-width 0.3, half-length 0.95.
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
  if shape == 4:  # Heart, lobes up (image v points down, the curve's y up).
    x = u * _HEART_RADIUS
    y = -v * _HEART_RADIUS + _HEART_CENTER_Y
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
  raise ValueError(f"unknown shape index {shape}; valid are 0..{len(SHAPES) - 1}")


def _bin(values: np.ndarray, low: float, high: float, num_bins: int) -> np.ndarray:
  """Equal-width bins of [low, high] -> int64 in [0, num_bins)."""
  scaled = (values - low) / max(high - low, 1e-9) * num_bins
  return np.clip(np.floor(scaled), 0, num_bins - 1).astype(np.int64)


def _place(rng: np.random.Generator, radii: np.ndarray, present: np.ndarray,
           low: float, high: float, min_radius: float):
  """Chooses non-overlapping centres, largest sprite first.

  Args:
    radii: (N, K) radii sorted descending along K.
    present: (N, K) bool, which slots hold a sprite.
    low, high: the square of allowed centres.
    min_radius: radii are shrunk (never below this) when a crowded image has
      no free spot for the drawn radius.
  Returns:
    centres (N, K, 2) float32 (x, y) and the possibly shrunk radii (N, K).
  """
  num, slots = radii.shape
  radii = radii.copy()
  centres = np.zeros((num, slots, 2), np.float64)
  for k in range(slots):
    candidates = rng.uniform(low, high, size=(num, _PLACEMENT_CANDIDATES, 2))
    if k == 0:
      clearance = np.full((num, _PLACEMENT_CANDIDATES), np.inf)
    else:
      # Free distance from each candidate to the bounding circles placed so far.
      distance = np.linalg.norm(
          candidates[:, :, None, :] - centres[:, None, :k, :], axis=-1)
      gaps = distance - radii[:, None, :k] - OBJECT_GAP
      gaps = np.where(present[:, None, :k], gaps, np.inf)
      clearance = gaps.min(axis=-1)
    # Prefer the first candidate that fits (keeps positions uniform); when none
    # does, take the freest one and shrink the sprite into it.
    fits = clearance >= radii[:, k:k + 1]
    choice = np.where(fits.any(axis=1), fits.argmax(axis=1), clearance.argmax(axis=1))
    rows = np.arange(num)
    centres[:, k] = candidates[rows, choice]
    best = clearance[rows, choice]
    radii[:, k] = np.where(present[:, k], np.clip(np.minimum(radii[:, k], best), min_radius, None),
                           radii[:, k])
  return centres, radii


def _rasterise(centres, radii, angles, shapes, colors, present, backgrounds, *,
               image_size: int, supersample: int) -> np.ndarray:
  """Draws sprites over backgrounds. Returns float32 (N, S, S, 3) in [0, 255].

  centres (N, K, 2), radii/angles (N, K), shapes (N, K) int, colors (N, K, 3),
  present (N, K) bool, backgrounds (N, S, S, 3).
  """
  num, slots = radii.shape
  fine = image_size * supersample
  # Sample points at the centres of the sub-pixels, in pixel units.
  grid = (np.arange(fine, dtype=np.float32) + 0.5) / supersample
  images = backgrounds.astype(np.float32)
  for k in range(slots):
    for shape in range(len(SHAPES)):
      rows = np.nonzero(present[:, k] & (shapes[:, k] == shape))[0]
      if rows.size == 0:
        continue
      dx = grid[None, None, :] - centres[rows, k, 0, None, None].astype(np.float32)
      dy = grid[None, :, None] - centres[rows, k, 1, None, None].astype(np.float32)
      cos = np.cos(angles[rows, k]).astype(np.float32)[:, None, None]
      sin = np.sin(angles[rows, k]).astype(np.float32)[:, None, None]
      scale = (1.0 / radii[rows, k]).astype(np.float32)[:, None, None]
      # Rotate the sample points by -angle into the sprite's own frame. With y
      # pointing down this turns the sprite clockwise on screen as angle grows.
      u = (cos * dx + sin * dy) * scale
      v = (-sin * dx + cos * dy) * scale
      mask = _inside(shape, u, v).astype(np.float32)
      coverage = mask.reshape(rows.size, image_size, supersample,
                              image_size, supersample).mean(axis=(2, 4))
      alpha = coverage[..., None]
      images[rows] = images[rows] * (1.0 - alpha) + colors[rows, k, None, None, :] * alpha
  return images


@dataclasses.dataclass(frozen=True)
class _Scenes:
  """Every random quantity of N scenes with K object slots (slots sorted by radius).

  counts (N,) sprites per image; present (N, K) bool; centres (N, K, 2) and
  radii (N, K) in pixels; shapes, color_ids (N, K) int; colors (N, K, 3)
  float32; angles_deg (N, K); tint (N, 1, 1, 3) float32 background tint;
  noise_seed seeds the background noise.
  """
  counts: np.ndarray
  present: np.ndarray
  centres: np.ndarray
  radii: np.ndarray
  shapes: np.ndarray
  color_ids: np.ndarray
  colors: np.ndarray
  angles_deg: np.ndarray
  tint: np.ndarray
  noise_seed: int


def _scale_range(num_images: int, min_objects: int, max_objects: int,
                 min_scale: Optional[float], max_scale: Optional[float],
                 supersample: int) -> tuple[float, float]:
  """Checks ``generate``'s arguments; returns (min_scale, max_scale) with defaults filled."""
  if num_images < 0:
    raise ValueError(f"num_images must be >= 0, got {num_images}")
  if not 1 <= min_objects <= max_objects:
    raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
  default_low, default_high = default_scale_range(max_objects)
  min_scale = default_low if min_scale is None else min_scale
  max_scale = default_high if max_scale is None else max_scale
  if not 0 < min_scale <= max_scale < 0.5:
    raise ValueError(f"need 0 < min_scale <= max_scale < 0.5, got {min_scale}, {max_scale}")
  if supersample < 1:
    raise ValueError(f"supersample must be >= 1, got {supersample}")
  return min_scale, max_scale


def _draw_scenes(rng: np.random.Generator, num: int, slots: int, *, min_objects: int,
                 max_objects: int, min_scale: float, max_scale: float, size: float,
                 low: float, high: float) -> _Scenes:
  """Draws every random quantity up front, in a fixed order, so the output does
  not depend on how the images are chunked. Scales are fractions of ``size``."""
  counts = rng.integers(min_objects, max_objects + 1, size=num)
  present = np.arange(slots)[None, :] < counts[:, None]
  radii = -np.sort(-rng.uniform(min_scale, max_scale, size=(num, slots)) * size, axis=1)
  shapes = rng.integers(0, len(SHAPES), size=(num, slots))
  color_ids = rng.integers(0, len(COLOR_NAMES), size=(num, slots))
  # Brightness jitter keeps colour a category, not an exact RGB value.
  colors = PALETTE[color_ids] * rng.uniform(0.75, 1.0, size=(num, slots, 1)).astype(np.float32)
  angles_deg = rng.uniform(0.0, 360.0, size=(num, slots))
  tint = rng.uniform(0.0, 30.0, size=(num, 1, 1, 3)).astype(np.float32)
  noise_seed = int(rng.integers(0, 2**31))
  centres, radii = _place(rng, radii, present, low, high,
                          min_radius=min(min_scale * size, 1.5))
  return _Scenes(counts, present, centres, radii, shapes, color_ids, colors, angles_deg,
                 tint, noise_seed)


def _draw_images(scenes: _Scenes, *, image_size: int, supersample: int, noise_std: float,
                 chunk_size: int) -> np.ndarray:
  """Rasterises the scenes over noisy backgrounds, chunk_size at a time -> uint8 (N, S, S, 3)."""
  num = len(scenes.counts)
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  noise_rng = np.random.default_rng(scenes.noise_seed)
  for start in range(0, num, chunk_size):
    stop = min(start + chunk_size, num)
    backgrounds = scenes.tint[start:stop] + noise_rng.normal(
        0.0, noise_std, size=(stop - start, image_size, image_size, 3)).astype(np.float32)
    drawn = _rasterise(
        scenes.centres[start:stop], scenes.radii[start:stop],
        np.radians(scenes.angles_deg[start:stop]), scenes.shapes[start:stop],
        scenes.colors[start:stop], scenes.present[start:stop],
        backgrounds, image_size=image_size, supersample=supersample)
    images[start:stop] = np.clip(np.round(drawn), 0, 255).astype(np.uint8)
  return images


def _scene_labels(scenes: _Scenes, *, low: float, high: float, min_radius: float,
                  max_radius: float, num_scale_bins: int, num_orientation_bins: int,
                  num_position_bins: int) -> dict[str, np.ndarray]:
  """``ATTRIBUTES`` (N,) and the per-sprite "objects/..." arrays (N, K), padded with -1."""
  present, centres, shapes = scenes.present, scenes.centres, scenes.shapes
  color_ids, angles_deg = scenes.color_ids, scenes.angles_deg
  symmetry = np.asarray(SYMMETRY_DEGREES)[shapes[:, 0]]
  x_bins = _bin(centres[..., 0], low, high, num_position_bins)
  y_bins = _bin(centres[..., 1], low, high, num_position_bins)
  lowest = np.where(present, centres[..., 1], -np.inf).argmax(axis=1)
  rows = np.arange(len(scenes.counts))
  out = {
      "shape": shapes[:, 0].astype(np.int64),
      "color": color_ids[:, 0].astype(np.int64),
      "scale_bin": _bin(scenes.radii[:, 0], min_radius, max_radius, num_scale_bins),
      "orientation_bin": np.minimum(
          np.floor(np.mod(angles_deg[:, 0], symmetry) / symmetry * num_orientation_bins),
          num_orientation_bins - 1).astype(np.int64),
      "x_bin": x_bins[:, 0],
      "y_bin": y_bins[:, 0],
      "count": (scenes.counts - 1).astype(np.int64),
      "lowest_y_bin": y_bins[rows, lowest],
      "shape_color": (shapes[:, 0] * len(COLOR_NAMES) + color_ids[:, 0]).astype(np.int64),
  }
  pad = lambda a, dtype: np.where(present, a, -1).astype(dtype)
  out.update({
      "objects/shape": pad(shapes, np.int64),
      "objects/color": pad(color_ids, np.int64),
      "objects/x": pad(centres[..., 0], np.float32),
      "objects/y": pad(centres[..., 1], np.float32),
      "objects/radius": pad(scenes.radii, np.float32),
      "objects/angle": pad(angles_deg, np.float32),
  })
  return out


def generate(num_images: int, seed: int, *, image_size: int = 32,
             min_objects: int = 1, max_objects: int = 1,
             min_scale: Optional[float] = None, max_scale: Optional[float] = None,
             num_scale_bins: int = 4, num_orientation_bins: int = 8,
             num_position_bins: int = 8, supersample: int = 2,
             noise_std: float = 2.0, chunk_size: int = 512) -> dict[str, np.ndarray]:
  """Generates sprite scenes and their labels; a pure function of its arguments.

  Args:
    num_images: N.
    seed: any int; the same arguments always give the same arrays.
    image_size: S (pixels per side).
    min_objects, max_objects: the number of sprites per image is uniform in
      [min_objects, max_objects].
    min_scale, max_scale: sprite radius as a fraction of S (default:
      ``default_scale_range(max_objects)``).
    num_scale_bins, num_orientation_bins, num_position_bins: label bins.
    supersample: anti-aliasing factor per axis (1 = hard edges).
    noise_std: standard deviation of the background noise (grey levels).
    chunk_size: images rasterised at once (bounds memory).

  Returns:
    A dict of numpy arrays:
      "image": uint8 (N, S, S, 3);
      every name in ``ATTRIBUTES``: int64 (N,), where shape, color, scale_bin,
        orientation_bin, x_bin and y_bin describe the largest sprite (object 0),
        count = number of sprites - 1, lowest_y_bin = y_bin of the sprite whose
        centre is lowest in the image (the nearest one, as in CLEVR-Dist), and
        shape_color = shape * len(COLOR_NAMES) + color;
      per-sprite arrays (N, max_objects), slots sorted by radius, largest first,
      padded with -1: "objects/shape", "objects/color" (int64) and
      "objects/x", "objects/y", "objects/radius" (pixels), "objects/angle"
      (degrees in [0, 360)) as float32.
  """
  min_scale, max_scale = _scale_range(num_images, min_objects, max_objects, min_scale,
                                      max_scale, supersample)
  size = float(image_size)
  margin = max_scale * size
  low, high = margin, size - margin
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5b717e5]))
  scenes = _draw_scenes(rng, num_images, max_objects, min_objects=min_objects,
                        max_objects=max_objects, min_scale=min_scale, max_scale=max_scale,
                        size=size, low=low, high=high)
  images = _draw_images(scenes, image_size=image_size, supersample=supersample,
                        noise_std=noise_std, chunk_size=chunk_size)
  labels = _scene_labels(scenes, low=low, high=high, num_scale_bins=num_scale_bins,
                         num_orientation_bins=num_orientation_bins,
                         num_position_bins=num_position_bins, min_radius=min_scale * size,
                         max_radius=max_scale * size)
  return {"image": images, **labels}
