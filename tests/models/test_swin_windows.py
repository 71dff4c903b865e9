"""Swin's window bookkeeping against hand-written NumPy versions."""

from __future__ import annotations

import numpy as np

import numpy_swin as ref
from vpt_jax.models import swin_windows


def test_windowing_helpers_against_hand_written_ones():
  for ws in (2, 3, 7):
    np.testing.assert_array_equal(swin_windows.relative_position_index(ws),
                                  ref.np_relative_index(ws))
  np.testing.assert_array_equal(swin_windows.shifted_window_mask(8, 2, 1),
                                ref.np_shift_mask(8, 2, 1))
  np.testing.assert_array_equal(swin_windows.shifted_window_mask(14, 7, 3),
                                ref.np_shift_mask(14, 7, 3))
  # A 7 x 7 map with window 7 (Swin-B's last stage at 224 px) is one unshifted window.
  assert swin_windows.block_window(7, 7, 1) == (7, 0)
  assert swin_windows.block_window(14, 7, 1) == (7, 3)
  assert swin_windows.block_window(14, 7, 0) == (7, 0)
