"""The paired bootstrap against a plain NumPy loop over the documented draws, and
its closed-form cases; the seed spread and the noise rule."""

import numpy as np
import pytest

from vpt_jax.protocol import bootstrap


def _loop_interval(correct_a, correct_b, resamples, seed, level):
  """Resample by resample, seed by seed: the module docstring's recipe."""
  n = correct_a.shape[1]
  rng = np.random.default_rng(seed)
  deltas = []
  for _ in range(resamples):
    idx = rng.integers(0, n, size=n)
    acc_a = np.mean([row[idx].mean() for row in correct_a])
    acc_b = np.mean([row[idx].mean() for row in correct_b])
    deltas.append(acc_a - acc_b)
  tail = 100 * (1 - level) / 2
  return np.percentile(deltas, [tail, 100 - tail])


def test_interval_matches_the_numpy_loop():
  labels = np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2])
  rng = np.random.default_rng(5)
  # Hand-made logits: A (2 seeds) mostly right, B (3 seeds) right about half the time.
  def logits_for(hits):
    out = rng.normal(size=(len(labels), 3))
    out[np.arange(len(labels)), labels] += np.where(hits, 10.0, -10.0)
    return out
  a = np.stack([bootstrap.correct(logits_for(rng.random(len(labels)) < 0.8), labels)
                for _ in range(2)])
  b = np.stack([bootstrap.correct(logits_for(rng.random(len(labels)) < 0.5), labels)
                for _ in range(3)])
  got = bootstrap.paired_bootstrap(a, b, resamples=150, seed=3, level=0.9)
  low, high = _loop_interval(a, b, 150, 3, 0.9)
  assert got["low"] == pytest.approx(low, abs=1e-12)
  assert got["high"] == pytest.approx(high, abs=1e-12)
  assert got["diff"] == pytest.approx(a.mean(axis=1).mean() - b.mean(axis=1).mean())
  assert (got["resamples"], got["seed"], got["level"]) == (150, 3, 0.9)


def test_closed_form_cases():
  right, wrong = np.ones((2, 9), bool), np.zeros((1, 9), bool)
  sure = bootstrap.paired_bootstrap(right, wrong)
  assert (sure["diff"], sure["low"], sure["high"]) == (1.0, 1.0, 1.0)
  same = bootstrap.paired_bootstrap(right[0], right[1])
  assert (same["low"], same["high"]) == (0.0, 0.0)
  with pytest.raises(ValueError, match="same examples"):
    bootstrap.paired_bootstrap(right, np.ones((2, 8), bool))


def test_correct_is_top1_and_noise_rule():
  logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float16)
  assert bootstrap.correct(logits, np.array([1, 1, 1])).tolist() == [True, False, True]
  assert bootstrap.seed_sd(0.03, 0.04) == pytest.approx(0.05)
  assert bootstrap.seed_sd(None, 0.04) is None
  interval = {"low": -0.01, "high": 0.02}
  assert bootstrap.inside_noise(0.005, interval, None)
  assert not bootstrap.inside_noise(0.03, {"low": 0.01, "high": 0.05}, 0.02)
  assert bootstrap.inside_noise(0.03, {"low": 0.01, "high": 0.05}, 0.04)  # within seed sd
  assert not bootstrap.inside_noise(0.03, None, None)
