"""Swin's window bookkeeping: pure functions over (numpy or jax) arrays.

Cutting a map into windows and back, the relative position index of a
window's token pairs, the mask of a cyclically shifted map, which (window,
shift) a block uses, and how prompts are spread over and averaged across an
image's windows (in this library's order or the reference's, see ``swin``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# The official shifted-window mask value (not -inf): exp(-100) underflows in float32.
MASK_VALUE = -100.0


def block_window(resolution: int, window: int, block_index: int) -> tuple[int, int]:
  """(window, shift) of block ``block_index`` on a resolution x resolution map.

  Odd blocks shift by window // 2; a map not larger than the window is one
  unshifted window (the official rule).
  """
  if resolution <= window:
    return resolution, 0
  return window, (window // 2 if block_index % 2 else 0)


def window_partition(x, window: int):
  """(B, H, W, C) -> (B, H/window * W/window, window^2, C); windows and their
  tokens in row-major order (numpy or jax arrays)."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window, window, width // window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(
      batch, (height // window) * (width // window), window * window, channels)


def window_reverse(windows, window: int, height: int, width: int):
  """Inverse of ``window_partition``: (B, nW, window^2, C) -> (B, H, W, C)."""
  batch, channels = windows.shape[0], windows.shape[-1]
  x = windows.reshape(batch, height // window, width // window, window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def relative_position_index(window: int) -> np.ndarray:
  """(window^2, window^2) int: row of the bias table for each (query, key) pair.

  For tokens at (y_q, x_q) and (y_k, x_k): (y_q - y_k + window - 1) * (2 * window - 1)
  + (x_q - x_k + window - 1), the official indexing.
  """
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
  coords = coords.reshape(2, -1)
  relative = coords[:, :, None] - coords[:, None, :] + (window - 1)
  return relative[0] * (2 * window - 1) + relative[1]


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
  """(nW, window^2, window^2) float32: MASK_VALUE between tokens of different regions.

  After the cyclic shift by ``shift`` the last window row/column holds tokens
  from the opposite border; the map is cut into 3 x 3 regions
  ([0, -window), [-window, -shift), [-shift, end) per axis) and tokens attend
  only within their region.
  """
  regions = np.zeros((1, resolution, resolution, 1), np.float32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  label = 0
  for rows in bounds:
    for cols in bounds:
      regions[:, rows, cols, :] = label
      label += 1
  windows = window_partition(regions, window)[0, :, :, 0]  # (nW, window^2)
  different = windows[:, None, :] != windows[:, :, None]
  return np.where(different, MASK_VALUE, 0.0).astype(np.float32)


def spread_over_windows(per_image, num_windows: int, reference_order: bool = False):
  """(B, ...) -> (B, nW, ...): what window w of image b gets.

  Its own image's entry, or, in the reference's order, entry (b * nW + w) mod B:
  the reference copies the prompts window-major (row k = w * B + b') but lays
  the windows out image-major (row k = b * nW + w).
  """
  batch, rest = per_image.shape[0], per_image.shape[1:]
  if not reference_order:
    return jnp.broadcast_to(per_image[:, None], (batch, num_windows) + rest)
  window_major = jnp.broadcast_to(per_image[None], (num_windows, batch) + rest)
  return window_major.reshape((batch, num_windows) + rest)


def average_over_windows(per_window, reference_order: bool = False):
  """(B, nW, ...) -> (B, ...): the mean over each image's windows.

  In the reference's order (``view(-1, B, ...).mean(0)`` on image-major rows)
  image j gets the mean over rows k = b * nW + w with k mod B = j instead.
  """
  if not reference_order:
    return per_window.mean(axis=1)
  batch, num_windows = per_window.shape[:2]
  return per_window.reshape((num_windows, batch) + per_window.shape[2:]).mean(axis=0)
