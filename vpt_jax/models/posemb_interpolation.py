"""DINOv2's position embedding: stored at the checkpoint's grid, interpolated per forward.

facebookresearch/dinov2 ``DinoVisionTransformer.interpolate_pos_encoding``
keeps the CLS row and resizes the (M, M) patch grid to the image's with
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``:

* the original models: ``interpolate_offset=0.1``, no antialias: the call
  passes ``scale_factor=(g + 0.1) / M`` (a historical work-around), so the
  output has g = floor(g + 0.1) rows while source coordinates use that scale;
* the register models (``*_reg``): ``interpolate_offset=0``, ``antialias=True``:
  the call passes ``size=(g, g)``;
* nothing is interpolated when the grid already is M x M.

torch's bicubic without antialias uses the Keys kernel with a = -0.75 and
replicates border pixels; with antialias it uses a = -0.5 (PIL's), widens the
kernel by the downscale factor and renormalises the weights over the pixels
inside the image. Both are linear maps along each axis, built here as
(g, M) matrices in NumPy at trace time and applied with one einsum, so the
interpolation is exact, differentiable and shape-static.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def _cubic(distance: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel at |distance| (0 beyond 2)."""
  x = np.abs(distance)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None,
                   antialias: bool = False) -> np.ndarray:
  """(out_size, in_size) weights of torch's 1-D bicubic resize (align_corners=False).

  ``scale_factor``: the factor passed to ``interpolate`` (its inverse maps
  output to input coordinates); None = in_size / out_size (``size=`` calls).
  """
  scale = 1.0 / scale_factor if scale_factor else in_size / out_size
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    if antialias:
      support = 2.0 * scale if scale >= 1 else 2.0
      center = scale * (i + 0.5)
      inverse = 1.0 / scale if scale >= 1 else 1.0
      first = max(int(center - support + 0.5), 0)
      last = min(int(center + support + 0.5), in_size)
      taps = np.arange(first, last)
      row = _cubic((taps - center + 0.5) * inverse, -0.5)
      weights[i, taps] = row / row.sum()
    else:
      source = (i + 0.5) * scale - 0.5
      base = math.floor(source)
      for k in range(-1, 3):
        weights[i, min(max(base + k, 0), in_size - 1)] += _cubic(source - (base + k), -0.75)
  return weights


def interpolation_matrix(stored_grid: int, grid: int, offset: float,
                         antialias: bool) -> np.ndarray:
  """The (grid, stored_grid) matrix DINOv2's call amounts to along one axis."""
  if offset:
    factor = (grid + offset) / stored_grid
    if math.floor(stored_grid * factor) != grid:
      raise ValueError(f"offset {offset} does not give {grid} rows from {stored_grid}")
    return bicubic_matrix(stored_grid, grid, factor, antialias)
  return bicubic_matrix(stored_grid, grid, None, antialias)


class InterpolatedPositionEmbs(nn.Module):
  """Adds DINOv2's position embedding to [CLS, patches] (B, 1 + g*g, D).

  The parameter ``pos_embedding`` is (1, 1 + M*M, D) with M = ``stored_grid``
  (the checkpoint's: 37 for DINOv2's 518 px / 14 training size).
  """
  stored_grid: int
  offset: float = 0.1
  antialias: bool = False

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    table = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                       (1, 1 + self.stored_grid ** 2, width))
    grid = math.isqrt(x.shape[1] - 1)
    if grid * grid != x.shape[1] - 1:
      raise ValueError(f"DINOv2's position embedding needs a square patch grid, got "
                       f"{x.shape[1] - 1} patches")
    if grid != self.stored_grid:
      matrix = jnp.asarray(interpolation_matrix(self.stored_grid, grid, self.offset,
                                                self.antialias), jnp.float32)
      patches = table[0, 1:].reshape(self.stored_grid, self.stored_grid, width)
      patches = jnp.einsum("ia,jb,abd->ijd", matrix, matrix, patches.astype(jnp.float32))
      table = jnp.concatenate([table[:, :1], patches.reshape(1, grid * grid, width)], axis=1)
    return x + table.astype(x.dtype)
