"""The report's summary rows on hand-made per-task numbers.

VTAB-1k papers report the mean of the three group means (Natural, Specialized,
Structured), which differs from the mean over the 19 tasks when the groups'
sizes differ (7, 4 and 8 tasks): both rows must be what their titles say.
"""

import pytest

from vpt_jax.protocol import report

# Per group: (number of tasks, our accuracy on each, the paper's on each).
GROUPS = {"natural": (7, 70.0, 60.0), "specialized": (4, 80.0, 90.0),
          "structured": (8, 50.0, 40.0)}


def _rows():
  rows = []
  for group, (count, ours, paper) in GROUPS.items():
    for i in range(count):
      rows.append({"task": f"vtab/{group}{i}", "title": f"{group}{i}", "group": group,
                   "cells": {"m": {"mean": ours, "std": None, "seeds": 1, "planned": 1,
                                   "paper": paper, "best": None, "diff": ours - paper}}})
  return rows


def test_group_means_all_task_mean_and_mean_of_group_means():
  summary = {row["title"]: row["cells"]["m"] for row in report.summary_rows("vtab", ["m"],
                                                                            _rows())}
  assert summary["Natural mean"]["mean"] == pytest.approx(70.0)
  assert summary["Specialized mean"]["mean"] == pytest.approx(80.0)
  assert summary["Structured mean"]["mean"] == pytest.approx(50.0)
  # (7 * 70 + 4 * 80 + 8 * 50) / 19 = 1210 / 19; papers: (420 + 360 + 320) / 19.
  assert summary["Mean of 19 tasks"]["mean"] == pytest.approx(1210 / 19)
  assert summary["Mean of 19 tasks"]["paper"] == pytest.approx(1100 / 19)
  # (70 + 80 + 50) / 3 = 66.67, the papers' (60 + 90 + 40) / 3 = 63.33.
  of_groups = summary["Mean of the 3 group means"]
  assert of_groups["mean"] == pytest.approx(200 / 3)
  assert of_groups["paper"] == pytest.approx(190 / 3)
  assert of_groups["diff"] == pytest.approx(10 / 3)
  assert of_groups["count"] == of_groups["total"] == 19


def test_mean_of_group_means_needs_every_group():
  rows = [r for r in _rows() if r["group"] != "specialized"]
  summary = {row["title"]: row["cells"]["m"] for row in report.summary_rows("vtab", ["m"], rows)}
  assert summary["Mean of the 3 group means"]["mean"] is None
  assert summary["Mean of 15 tasks"]["mean"] == pytest.approx((7 * 70 + 8 * 50) / 15)
