"""Selecting the best grid point: ties, diverged runs, missing runs."""

import pytest

from vpt_jax.protocol import run_plan
from vpt_jax.protocol import selection


def _records(scores, lrs=(1.0, 0.5, 0.25), wds=(0.01, 0.001)):
  out = []
  for lr in lrs:
    for wd in wds:
      score = scores.get((lr, wd), 0.1)
      record = (None if score is None else
                {"status": "diverged"} if score == "nan" else
                {"status": "finished", "results": {"val": {"top1": score}}})
      out.append((run_plan.RunSpec("vtab/dmlab", "tune", lr, wd), record))
  return out


def test_selection_ties_go_to_the_smaller_lr():
  best = selection.select(_records({(1.0, 0.01): 0.8, (0.5, 0.001): 0.9, (0.25, 0.01): 0.9}))
  assert (best["lr"], best["weight_decay"], best["val_top1"]) == (0.25, 0.01, 0.9)
  # Equal scores at one lr: the first visited (larger) weight decay stays.
  best = selection.select(_records({(0.5, 0.01): 0.9, (0.5, 0.001): 0.9}))
  assert (best["lr"], best["weight_decay"]) == (0.5, 0.01)
  # A higher score wins whatever its lr; diverged runs score nothing.
  best = selection.select(_records({(1.0, 0.001): 0.95, (0.25, 0.01): "nan"}))
  assert (best["lr"], best["weight_decay"]) == (1.0, 0.001)
  assert selection.select(_records({(0.5, 0.01): None})) is None  # a run is missing
  with pytest.raises(run_plan.ProtocolError, match="diverged"):
    selection.select(_records({k: "nan" for k in [(1.0, 0.01), (1.0, 0.001), (0.5, 0.01),
                                                (0.5, 0.001), (0.25, 0.01), (0.25, 0.001)]}))
