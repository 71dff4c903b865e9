"""The soak benchmark's memory measures and verdict: they decide whether memory leaks.

``benchmarks/soak.py`` is loaded from its file (benchmarks/ is not a package).
"""

import argparse
import gc
import os
import sys

import numpy as np
import pytest

from tests import benchmark_scripts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


soak = benchmark_scripts.load("soak")


def _args(**overrides):
  defaults = dict(steps=5000, sample_every=100, eval_every=500, checkpoint_every=250,
                  export_every=1000, skip_fraction=0.2, max_slope=1.0)
  return argparse.Namespace(**{**defaults, **overrides})


def test_median_slope_ignores_a_jump_that_few_pairs_straddle():
  x = np.arange(10, dtype=np.float64)
  y = 2.0 * x + 1.0
  assert soak.median_slope(x, y) == pytest.approx(2.0)
  # Memory handed back once, between the 8th and 9th samples: 8 x 2 = 16 of
  # the 45 pairs straddle the drop, the other 29 still have slope 2, so the
  # median is 2 while least squares turns negative.
  y_drop = y - 100.0 * (x >= 8)
  assert np.polyfit(x, y_drop, 1)[0] < 0
  assert soak.median_slope(x, y_drop) == pytest.approx(2.0)


def test_fit_window_starts_after_every_periodic_event():
  # The latest first event (export at 1000) beats 20% of 5000 steps.
  assert soak.fit_start(_args()) == 1000
  assert soak.fit_start(_args(steps=50000, sample_every=500)) == 10000
  # Rounded up to a sample step.
  assert soak.fit_start(_args(export_every=1050)) == 1100
  # Events beyond the run never happen and do not delay the window.
  assert soak.fit_start(_args(steps=20000, sample_every=1000, eval_every=10**6,
                              checkpoint_every=10**6, export_every=10**6)) == 4000


def _samples(slope_mb_per_step: float, steps=5000, every=100):
  return [{"step": s, "anon_mb": 400 + slope_mb_per_step * s, "live_arrays": 60,
           "malloc_used_mb": 150.0, "python_blocks": 10**6} for s in range(0, steps + 1, every)]


def test_verdict_separates_growth_from_flat():
  slope, text = soak.verdict(_samples(0.0), _args())
  assert slope == pytest.approx(0.0) and "no growth" in text
  slope, text = soak.verdict(_samples(0.002), _args())  # 2 MB per 1000 steps
  assert slope == pytest.approx(2.0) and "GROWS" in text


@pytest.mark.skipif(soak.MALLINFO2 is None or not sys.platform.startswith("linux"),
                    reason="needs glibc's mallinfo2")
def test_malloc_accounting_sees_an_allocation_and_its_release():
  before = soak.heap_mb()["malloc_used_mb"]
  block = np.ones(64 * 2**20, np.uint8)  # 64 MiB from malloc (mmapped)
  during = soak.heap_mb()["malloc_used_mb"]
  del block
  after = soak.heap_mb()["malloc_used_mb"]
  assert during - before == pytest.approx(64, abs=1)
  assert during - after == pytest.approx(64, abs=1)


def test_python_block_count_sees_new_objects():
  # The count is the process's: a garbage collection that the 20,000 new lists
  # trigger would free earlier tests' cycles in between (seen in CI: the count
  # fell by 10,000). Collect first, and not during the measurement.
  gc.collect()
  gc.disable()
  try:
    before = soak.heap_mb()["python_blocks"]
    kept = [[i] for i in range(20000)]  # 20,000 small lists, each at least one block
    after = soak.heap_mb()["python_blocks"]
  finally:
    gc.enable()
  assert after - before >= 20000
  del kept
