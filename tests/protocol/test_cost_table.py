"""The report's cost columns from hand-made final runs, and V-PETL Bench's PPT
against the numbers its README prints."""

import csv

import pytest

import protocol_fixtures
from vpt_jax.protocol import cost_table
from vpt_jax.protocol import report


def test_ppt_reproduces_v_petl_bench_readme():
  # (mean top-1, params) -> PPT from the README's VTAB and FGVC tables.
  for top1, params, printed in ((69.43, 0.56e6, 0.68), (71.44, 0.16e6, 0.71),
                                (89.10, 0.85e6, 0.86), (84.78, 0.77e6, 0.82),
                                (52.94, 0.0, 0.53)):
    assert round(cost_table.ppt(top1, params), 2) == printed


def _cost(trainable, without_head, speed, mergeable=False):
  return {"trainable_params": trainable, "trainable_params_without_head": without_head,
          "export_bytes": 2e6, "train_images_per_s": speed, "peak_memory_bytes": 3e9,
          "inference_images_per_s": 2 * speed, "flops_per_image": 17.5e9,
          "mergeable": mergeable, "memory_kind": "device peak_bytes_in_use",
          "device": {"platform": "tpu", "kind": "TPU v4", "count": 4}}


def test_method_rows_average_seeds_then_tasks(tmp_path):
  workdir = str(tmp_path)
  write = protocol_fixtures.write_finished_task
  write(workdir, "vtab/dmlab", "vpt_deep", {42: (0.5, None, None), 44: (0.7, None, None)},
        costs={42: _cost(1000, 400, 100.0), 44: _cost(1000, 400, 300.0)})
  write(workdir, "vtab/dtd", "vpt_deep", {42: (0.8, None, None)},
        costs={42: _cost(2000, 800, 400.0)})
  write(workdir, "vtab/dtd", "linear", {42: (0.4, None, None)})  # no costs recorded
  summaries = report.collect([workdir])
  row, = cost_table.method_rows(summaries, ["vpt_deep", "linear"])
  assert row["tasks"] == 2 and row["top1"] == pytest.approx(70.0)  # (60 + 80) / 2
  assert row["trainable_params_without_head"] == pytest.approx(600)
  assert row["train_images_per_s"] == pytest.approx((200 + 400) / 2)
  assert row["ppt"] == pytest.approx(cost_table.ppt(70.0, 600))
  assert row["device"] == ["TPU v4 x4"] and row["mergeable"] is False
  text = cost_table.markdown([row])
  assert "| vpt_deep | 2 | 70.00 |" in text and "| 17.500 | no | TPU v4 x4 |" in text
  path = str(tmp_path / "costs.csv")
  cost_table.write_csv(path, summaries)
  rows = list(csv.DictReader(open(path)))
  assert [(r["task"], r["method"]) for r in rows] == [("vtab/dmlab", "vpt_deep"),
                                                      ("vtab/dtd", "vpt_deep")]
  assert float(rows[0]["train_images_per_s"]) == 200


def test_report_has_the_cost_section_and_plot(tmp_path):
  workdir = str(tmp_path / "runs")
  protocol_fixtures.write_finished_task(workdir, "vtab/dmlab", "lora", {42: (0.5, None, None)},
                                        costs={42: _cost(500, 0, 50.0, mergeable=True)})
  text = open(report.write_report(workdir)).read()
  assert "### VTAB-1k: costs" in text and "| lora | 1 | 50.00 | 0.50 |" in text
  assert (tmp_path / "runs" / "report" / "params_vs_accuracy_vtab.png").stat().st_size > 1000
