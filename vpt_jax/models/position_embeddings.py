"""Position embeddings of the ViT flavours: learned, or 2-D sin-cos (MAE, MoCo v3)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def sincos_posemb(grid_side: int, width: int, rows_first: bool) -> np.ndarray:
  """2-D sin-cos position embedding of a square grid, with a zero CLS row.

  Token t = r * grid_side + c (row-major patches) gets
  [sin(a w), cos(a w), sin(b w), cos(b w)] with w_k = 10000^(-k / (width/4)),
  k < width / 4, where (a, b) = (r, c) if ``rows_first`` (MoCo v3's layout:
  its meshgrid puts the row first) and (c, r) otherwise (MAE's layout).

  Returns:
    float32 (1, 1 + grid_side^2, width); row 0 (CLS) is zero.
  """
  if width % 4:
    raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, "
                     f"got {width}")
  omega = 1.0 / 10000.0 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  rows, cols = np.divmod(np.arange(grid_side * grid_side, dtype=np.float64), grid_side)
  first, second = (rows, cols) if rows_first else (cols, rows)
  angles_a, angles_b = np.outer(first, omega), np.outer(second, omega)
  grid = np.concatenate([np.sin(angles_a), np.cos(angles_a), np.sin(angles_b),
                         np.cos(angles_b)], axis=1)
  return np.concatenate([np.zeros((1, width)), grid])[None].astype(np.float32)


POSEMB_INITS = ("learned", "sincos_rows_first", "sincos_columns_first")


class AddPositionEmbs(nn.Module):
  """Adds a position embedding parameter (1, N, D) to (B, N, D) tokens.

  ``init_scheme``: "learned" draws N(0, 0.02); the sin-cos schemes start from
  ``sincos_posemb`` (N = 1 + a square grid; row 0 is CLS's).
  """
  init_scheme: str = "learned"

  @nn.compact
  def __call__(self, x):
    if self.init_scheme == "learned":
      init = nn.initializers.normal(stddev=0.02)
    elif self.init_scheme in POSEMB_INITS:
      grid_side = math.isqrt(x.shape[1] - 1)
      if grid_side * grid_side != x.shape[1] - 1:
        raise ValueError(f"a sin-cos position embedding needs a square patch grid, got "
                         f"{x.shape[1] - 1} patches")
      table = sincos_posemb(grid_side, x.shape[2], self.init_scheme == "sincos_rows_first")
      init = lambda key, shape: jnp.asarray(table)
    else:
      raise ValueError(f"Unknown position embedding init {self.init_scheme!r}; choose one "
                       f"of {POSEMB_INITS}")
    pos_embedding = self.param("pos_embedding", init, (1,) + x.shape[1:])
    return x + pos_embedding.astype(x.dtype)
