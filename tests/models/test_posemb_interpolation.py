"""posemb_interpolation: torch's bicubic weights against hand-computed values.

(The whole DINOv2 interpolation is checked against an independent NumPy
implementation in test_dinov2_family; against torch itself see the README.)
"""

from __future__ import annotations

import numpy as np
import pytest

from vpt_jax.models import posemb_interpolation as interpolation


def test_upsampling_weights_by_hand():
  # 2 -> 4, a = -0.75: output 0 reads source -0.25 (base -1, t = 0.75); the
  # taps at -2 and -1 are replicated onto pixel 0.
  # K(1.75) = -0.03515625, K(0.75) = 0.26171875, K(0.25) = 0.87890625, K(1.25) = -0.10546875.
  weights = interpolation.bicubic_matrix(2, 4)
  np.testing.assert_allclose(weights[0], [-0.03515625 + 0.26171875 + 0.87890625, -0.10546875])
  np.testing.assert_allclose(weights[3], weights[0][::-1])  # mirror symmetry


def test_antialias_downsampling_by_hand():
  # 4 -> 2 with antialias: scale 2, support 4, a = -0.5; output 0's centre is 1.0 and
  # pixel j sits at distance (j + 0.5 - 1) / 2: K(0.25), K(0.25), K(0.75), K(1.25)
  # with K(0.25) = 0.8671875, K(0.75) = 0.2265625, K(1.25) = -0.0703125, normalised.
  raw = np.array([0.8671875, 0.8671875, 0.2265625, -0.0703125])
  np.testing.assert_allclose(interpolation.bicubic_matrix(4, 2, antialias=True)[0],
                             raw / raw.sum())


@pytest.mark.parametrize("stored, grid, offset, antialias",
                         [(37, 16, 0.1, False), (37, 16, 0.0, True), (5, 7, 0.1, False)])
def test_rows_sum_to_one_and_same_grid_is_identity(stored, grid, offset, antialias):
  matrix = interpolation.interpolation_matrix(stored, grid, offset, antialias)
  assert matrix.shape == (grid, stored)
  np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
  np.testing.assert_allclose(interpolation.bicubic_matrix(stored, stored), np.eye(stored),
                             atol=1e-12)
