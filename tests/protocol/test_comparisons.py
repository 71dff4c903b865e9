"""Method-versus-method differences and per-class accuracies from hand-made final
runs with saved predictions (and without)."""

import numpy as np
import pytest

import protocol_fixtures
from vpt_jax.protocol import bootstrap
from vpt_jax.protocol import comparisons
from vpt_jax.protocol import report

LABELS = np.array([0, 1, 1, 0, 1, 0])


def _logits(predicted):
  return np.eye(2)[np.asarray(predicted)]


@pytest.fixture()
def summaries(tmp_path):
  workdir = str(tmp_path)
  wrong_last = [0, 1, 1, 0, 1, 1]  # misses the last example (class 0)
  half = [0, 1, 1, 1, 0, 1]        # right on examples 0-2 only
  write = protocol_fixtures.write_finished_task
  write(workdir, "vtab/dmlab", "vpt_deep", {42: (1.0, None, (_logits(LABELS), LABELS)),
                                            44: (5 / 6, None, (_logits(wrong_last), LABELS))})
  write(workdir, "vtab/dmlab", "linear", {42: (0.5, None, (_logits(half), LABELS)),
                                          44: (0.5, None, (_logits(half), LABELS))})
  write(workdir, "vtab/dmlab", "full", {42: (0.6, None, None)})
  return report.collect([workdir])


def test_pairs_carry_seed_sd_and_the_paired_interval(summaries):
  rows = {(r["a"], r["b"]): r for r in comparisons.rows(summaries, list(report.METHOD_ORDER))}
  assert sorted(rows) == sorted([("vpt_deep", "linear"), ("vpt_deep", "full"),
                                 ("linear", "full")])
  row = rows[("vpt_deep", "linear")]
  assert row["diff"] == pytest.approx((1 + 5 / 6) / 2 - 0.5)
  assert row["sd"] == pytest.approx(np.hypot(np.std([1, 5 / 6]), 0.0))
  correct_a = np.stack([np.ones(6, bool), np.arange(6) < 5])
  correct_b = np.stack([np.arange(6) < 3] * 2)
  assert row["interval"] == bootstrap.paired_bootstrap(correct_a, correct_b)
  assert row["noise"] == bootstrap.inside_noise(row["diff"], row["interval"], row["sd"])
  one_seed = rows[("vpt_deep", "full")]
  assert one_seed["interval"] is None and "save_predictions" in one_seed["note"]
  assert one_seed["sd"] is None  # one seed of full: no spread


def test_markdown_and_per_class_table(summaries):
  text = comparisons.markdown(summaries, list(report.METHOD_ORDER))
  assert "1000 resamples, seed 0" in text
  line = next(l for l in text.splitlines() if "| vpt_deep | linear |" in l)
  assert "+41.67" in line and "[" in line
  table = comparisons.per_class(summaries, list(report.METHOD_ORDER))
  lines = table.splitlines()
  assert lines[2] == "| class | examples | vpt_deep | linear |"  # full saved none
  # Class 0 (examples 0, 3, 5): vpt_deep 3/3 and 2/3 -> 83.3; linear 1/3 -> 33.3.
  assert lines[4] == "| 0 | 3 | 83.3 | 33.3 |"
  # Class 1 (examples 1, 2, 4): vpt_deep 100; linear 2/3.
  assert lines[5] == "| 1 | 3 | 100.0 | 66.7 |"


def test_labels_that_differ_are_not_paired(tmp_path):
  workdir = str(tmp_path)
  other = LABELS[::-1].copy()
  protocol_fixtures.write_finished_task(workdir, "vtab/dmlab", "vpt_deep",
                                        {42: (1.0, None, (_logits(LABELS), LABELS))})
  protocol_fixtures.write_finished_task(workdir, "vtab/dmlab", "linear",
                                        {42: (1.0, None, (_logits(other), other))})
  row, = comparisons.rows(report.collect([workdir]), list(report.METHOD_ORDER))
  assert row["interval"] is None and row["note"] == "test labels differ: not paired"
