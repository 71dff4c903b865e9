"""Where a summary's final runs are, and when their saved predictions can be stacked."""

import os

import numpy as np

import protocol_fixtures
from vpt_jax.protocol import final_runs
from vpt_jax.protocol import report
from vpt_jax.protocol import run_plan

LABELS = np.array([0, 1, 1])


def test_run_dir_is_the_protocols_folder(tmp_path):
  protocol_fixtures.write_finished_task(str(tmp_path), "vtab/dmlab", "vpt_deep",
                                        {44: (0.5, None, None)})
  summary, = report.collect([str(tmp_path)])
  spec = run_plan.RunSpec("vtab/dmlab", "final", seed=44)
  assert final_runs.run_dir(summary, 44) == os.path.join(str(tmp_path), spec.folder("vpt_deep"))
  assert final_runs.record(summary, 44)["status"] == "finished"
  assert final_runs.record(summary, 42) is None


def test_predictions_stack_only_when_every_seed_saved_them(tmp_path):
  write = protocol_fixtures.write_finished_task
  hits = np.eye(2)[[0, 1, 0]]  # right, right, wrong
  write(str(tmp_path / "all"), "vtab/dmlab", "m", {42: (0.6, None, (hits, LABELS)),
                                                   44: (0.6, None, (np.eye(2)[LABELS], LABELS))})
  write(str(tmp_path / "some"), "vtab/dmlab", "m", {42: (0.6, None, (hits, LABELS)),
                                                    44: (0.6, None, None)})
  correct, labels = final_runs.test_predictions(report.collect([str(tmp_path / "all")])[0])
  assert correct.tolist() == [[True, True, False], [True, True, True]]
  assert labels.tolist() == [0, 1, 1]
  assert final_runs.test_predictions(report.collect([str(tmp_path / "some")])[0]) is None
