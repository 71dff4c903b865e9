"""The protocol's report: tables against the paper's numbers, means, CSV and plots.

VTAB-1k papers report the mean of the three group means (Natural, Specialized,
Structured), which differs from the mean over the 19 tasks when the groups'
sizes differ (7, 4 and 8 tasks): both summary rows must be what their titles
say, checked on hand-made per-task numbers below.
"""

import numpy as np
import pytest

import protocol_fixtures
from vpt_jax.protocol import hparams
from vpt_jax.protocol import report
from vpt_jax.protocol import run_records
from vpt_jax.protocol import tuning

protocol_config = protocol_fixtures.protocol_config
StubRun = protocol_fixtures.StubRun
SMALL = protocol_fixtures.SMALL


def test_report_tables_means_and_plots(tmp_path):
  """Stub results equal to the paper's numbers: every difference is 0."""
  workdir = str(tmp_path)
  paper = hparams.PAPER_RESULTS["vpt_deep"]

  def as_paper(config, run_dir):
    results = StubRun()(config, run_dir)
    if "test" in results:
      results["test"]["top1"] = paper[config.data.task] / 100
    return results
  config = protocol_config("method=vpt_deep,tasks=all", **{
      "protocol.lrs": (1.0,), "protocol.weight_decays": (0.0,), "protocol.seeds": (42,)})
  tuning.run_protocol(config, workdir, as_paper)
  text = (tmp_path / "report" / "report.md").read_text()
  assert "recalled" in text and "unverified" in text
  vtab_tasks = [k for k in paper if k.startswith("vtab/")]
  natural = np.mean([paper[f"vtab/{t}"] for t in (
      "cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn",
      "sun397")])
  mean19 = np.mean([paper[t] for t in vtab_tasks])
  for label, value in (("Natural mean", natural), ("Mean of 19 tasks", mean19)):
    line = next(l for l in text.splitlines() if f"**{label}**" in l)
    assert f"| {value:.1f} | {value:.1f} | +0.0 |" in line, line
  line = next(l for l in text.splitlines() if "Mean of the 3 group means" in l)
  assert "+0.0" in line
  rows = (tmp_path / "report" / "results.csv").read_text().splitlines()
  assert rows[0].startswith("benchmark,task,group,method") and len(rows) == 1 + 19 + 5
  for name in ("bars_vtab.png", "curves_vpt_deep.png"):
    assert (tmp_path / "report" / name).stat().st_size > 1000, name
  # A second method's folder shows up as more columns.
  other = str(tmp_path / "linear")
  tuning.run_protocol(protocol_config("method=linear,tasks=dmlab", **SMALL), other,
                      StubRun(), write_report=False)
  report.write_report(workdir, str(tmp_path / "both"), (other,))
  header = (tmp_path / "both" / "report.md").read_text().split("## VTAB-1k")[1].splitlines()[2]
  assert "vpt_deep" in header and "linear" in header


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


def test_the_report_reads_each_final_run_once(tmp_path, monkeypatch):
  # The data checks, the cost section and costs.csv share one read of each run.json.
  workdir = str(tmp_path / "runs")
  fp = protocol_fixtures.fake_fingerprint
  cost = {"trainable_params": 10, "device": {"kind": "cpu", "count": 1}}
  protocol_fixtures.write_finished_task(
      workdir, "vtab/dmlab", "lora", {s: (0.5, {"test": fp("test")}, None) for s in (42, 44)},
      costs={42: cost, 44: cost})
  reads = []
  read_json = run_records.read_json
  monkeypatch.setattr(run_records, "read_json", lambda path: reads.append(path) or
                      read_json(path))
  text = open(report.write_report(workdir)).read()
  assert "### VTAB-1k: costs" in text and "| vtab/dmlab | lora | unverified |" in text
  run_files = sorted(p for p in reads if p.endswith("run.json"))
  assert len(run_files) == 2 and len(set(run_files)) == 2
