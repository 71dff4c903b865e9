"""How sure a method-versus-method difference is: seed spread and a paired bootstrap.

Two methods scored on the same test examples (their saved predictions,
``training/predictions.py``), each with one or more seeds, differ by

  delta = mean over seeds of A's accuracy - mean over seeds of B's accuracy.

The paired bootstrap resamples the test examples, the same indices for both
methods (so an example that is hard for both counts once on each side): with
``rng = np.random.default_rng(seed)``, resample r draws
``rng.integers(0, N, size=N)`` (resamples drawn one after another, r = 0, 1,
...), and its delta is the mean over the drawn examples of
``p_A - p_B``, where ``p`` is an example's fraction of seeds that classify it
correctly. The interval is the percentile interval (NumPy's default linear
interpolation) of the ``resamples`` deltas. Defaults: ``RESAMPLES`` = 1000,
``SEED`` = 0, ``LEVEL`` = 0.95.

The seed standard deviation of the difference is sqrt(sd_A^2 + sd_B^2) of the
two methods' population standard deviations over seeds (the spread of a
single-seed difference: seeds are not paired across methods). A difference is
"inside the noise" when its bootstrap interval contains 0 or its size is at
most that seed standard deviation.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
# Resamples drawn per NumPy call: bounds the (chunk, N) index array's memory.
_CHUNK = 64


def correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Whether the top-1 class is the label. (N, C), (N,) -> bool (N,)."""
  return np.argmax(np.asarray(logits, np.float32), axis=-1) == labels


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, *,
                     resamples: int = RESAMPLES, seed: int = SEED,
                     level: float = LEVEL) -> dict:
  """The bootstrap interval of accuracy(A) - accuracy(B) (module docstring).

  Args:
    correct_a: bool (seeds_A, N) or (N,): A's correct examples per seed.
    correct_b: bool (seeds_B, N) or (N,), the same N examples in the same order.
    resamples, seed, level: the bootstrap's draws and the interval's coverage.

  Returns:
    {"diff": the observed delta, "low", "high": the interval (fractions, not
    %), "resamples", "seed", "level"}.
  """
  p_a = np.atleast_2d(correct_a).astype(np.float64).mean(axis=0)
  p_b = np.atleast_2d(correct_b).astype(np.float64).mean(axis=0)
  if p_a.shape != p_b.shape or not p_a.size:
    raise ValueError(f"paired bootstrap needs the same examples: {p_a.shape} vs {p_b.shape}")
  per_example = p_a - p_b
  n = per_example.size
  rng = np.random.default_rng(seed)
  deltas = []
  for start in range(0, resamples, _CHUNK):
    # One (k, N) draw is the same stream as k draws of N (PCG64, bounded integers).
    indices = rng.integers(0, n, size=(min(_CHUNK, resamples - start), n))
    deltas.append(per_example[indices].mean(axis=1))
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(np.concatenate(deltas), [tail, 100 - tail])
  return {"diff": float(per_example.mean()), "low": float(low), "high": float(high),
          "resamples": resamples, "seed": seed, "level": level}


def seed_sd(sd_a: Optional[float], sd_b: Optional[float]) -> Optional[float]:
  """sqrt(sd_A^2 + sd_B^2), or None when either is unknown."""
  if sd_a is None or sd_b is None:
    return None
  return float(np.hypot(sd_a, sd_b))


def inside_noise(diff: float, interval: Optional[dict], sd: Optional[float]) -> bool:
  """Whether ``diff`` is inside the noise: the interval holds 0, or |diff| <= sd."""
  if interval is not None and interval["low"] <= 0.0 <= interval["high"]:
    return True
  return sd is not None and abs(diff) <= sd
