"""The data each result read, against canonical fingerprints and the task's other
runs, on hand-made final runs; and the report's data section and marks."""

import protocol_fixtures
from vpt_jax.protocol import data_checks
from vpt_jax.protocol import report

fp = protocol_fixtures.fake_fingerprint
CANONICAL = {"vtab/dmlab": {"train800val200": fp("train800val200"), "test": fp("test")}}


def _data(**test_hashes):
  return {"train": fp("train800val200"), "test": fp("test", **test_hashes)}


def _write(workdir):
  write = protocol_fixtures.write_finished_task
  write(workdir, "vtab/dmlab", "vpt_deep", {s: (0.5, _data(), None) for s in (42, 44, 82)})
  write(workdir, "vtab/dmlab", "linear", {42: (0.4, _data(pixels="jpeg"), None),
                                          44: (0.4, _data(pixels="jpeg"), None)})
  write(workdir, "vtab/dmlab", "full", {42: (0.6, None, None)})
  return report.collect([workdir])


def test_matches_differs_unrecorded(tmp_path):
  found = data_checks.statuses(_write(str(tmp_path)), CANONICAL)
  assert found[("vtab/dmlab", "vpt_deep")] == {"state": "matches", "details": []}
  linear = found[("vtab/dmlab", "linear")]
  assert linear["state"] == "differs"
  assert linear["details"] == [  # one line for the seeds that show the same difference
      "seeds 42, 44 test vs canonical test: pixels: the decoded images differ",
      "seeds 42, 44 test vs vpt_deep seed 42: pixels: the decoded images differ"]
  assert found[("vtab/dmlab", "full")]["state"] == "unrecorded"


def test_without_canonical_runs_are_unverified_but_still_compared(tmp_path):
  found = data_checks.statuses(_write(str(tmp_path)), {})
  assert found[("vtab/dmlab", "vpt_deep")]["state"] == "unverified"
  assert found[("vtab/dmlab", "linear")]["details"] == [
      "seeds 42, 44 test vs vpt_deep seed 42: pixels: the decoded images differ"]
  assert data_checks.load_canonical() == {}  # none computed here: every result unverified


def test_another_image_size_leaves_pixels_unverified(tmp_path):
  data = {"test": dict(fp("test"), image_size=384)}
  protocol_fixtures.write_finished_task(str(tmp_path), "vtab/dmlab", "vpt_deep",
                                        {42: (0.5, data, None)})
  found = data_checks.statuses(report.collect([str(tmp_path)]), CANONICAL)
  assert found[("vtab/dmlab", "vpt_deep")] == {"state": "unverified", "details": []}


def test_report_marks_results_whose_data_differ(tmp_path):
  workdir = str(tmp_path / "runs")
  _write(workdir)
  text = open(report.write_report(workdir)).read()
  assert "## Data" in text and "| vtab/dmlab | linear | differs |" in text
  line = next(l for l in text.splitlines() if l.startswith("| DMLab"))
  assert line.count("(data differs)") == 1  # linear's cell (vs vpt_deep's data)
  assert "## Differences between methods" in text
