"""The protocol's report: tables against the paper's numbers, means, CSV and plots."""

import numpy as np

import protocol_fixtures
from vpt_jax.protocol import hparams
from vpt_jax.protocol import report
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
