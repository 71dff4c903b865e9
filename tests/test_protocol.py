"""The tuning protocol (grid, selection with ties, seeds, resume, shards) with a
stubbed run function, the report, and one tiny real protocol end to end."""

import json
import os

import numpy as np
import pytest

import checkpoint_fixtures
from configs import vtab_protocol
from vpt_jax import cli
from vpt_jax.protocol import hparams
from vpt_jax.protocol import report
from vpt_jax.protocol import tuning
from vpt_jax.training import trainer


def protocol_config(arg="", **overrides):
  config = vtab_protocol.get_config(arg)
  config.unlock()
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  config.lock()
  return config


class StubRun:
  """Records calls; val top-1 from ``val`` {(lr, wd): score}, test from the seed."""

  def __init__(self, val=None, diverge_lr=None, fail_after=None):
    self.calls, self.val, self.diverge_lr, self.fail_after = [], val or {}, diverge_lr, fail_after

  def __call__(self, config, workdir):
    if self.fail_after is not None and len(self.calls) >= self.fail_after:
      raise KeyboardInterrupt("preempted")
    self.calls.append((config, workdir))
    lr, wd = config.optim.base_lr, config.optim.weight_decay
    if lr == self.diverge_lr:
      raise FloatingPointError("loss became nan at step 3")
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for step in range(1, 4):
        f.write(json.dumps({"step": step, "train/loss": 2.0 / step}) + "\n")
    results = {}
    if config.data.eval_split:
      results["val"] = {"top1": self.val.get((lr, wd), 0.5), "count": 200}
    if config.data.test_split:
      results["test"] = {"top1": 0.5 + config.seed / 10000, "count": 100}
    return results


# ----------------------------------------------------------------- the plan

def test_reference_grids_and_seeds_per_method():
  runs = tuning.plan(protocol_config("method=vpt_deep,tasks=dmlab+eurosat"))
  tune = [r for r in runs if r.phase == "tune"]
  assert len(tune) == 2 * 10 * 4 and len(runs) == 2 * (40 + 5)
  assert [(r.lr, r.weight_decay) for r in tune[:5]] == [
      (50.0, 0.01), (50.0, 0.001), (50.0, 0.0001), (50.0, 0.0), (25.0, 0.01)]
  assert [r.seed for r in runs[40:45]] == [42, 44, 82, 100, 800]
  full = tuning.grid(protocol_config("method=full,tasks=dmlab"), "vtab/dmlab")
  assert full == ((0.005, 0.001, 0.0005, 0.0001), (0.01, 0.001, 0.0001, 0.0))
  cub = tuning.grid(protocol_config("method=vpt_deep,tasks=fgvc/cub"), "fgvc/cub")
  assert 0.05 not in cub[0] and len(cub[0]) == 9  # tune_fgvc.py's prompt grid
  assert tuning.parse_tasks("structured+fgvc/all")[-5:] == [
      "fgvc/cub", "fgvc/nabirds", "fgvc/oxford_flowers", "fgvc/stanford_dogs",
      "fgvc/stanford_cars"]


def test_run_configs_per_phase():
  config = protocol_config("method=vpt_deep,tasks=clevr_dist")
  tune = tuning.run_config(config, tuning.RunSpec("vtab/clevr_dist", "tune", 2.5, 1e-3, 42))
  assert (tune.data.task, tune.data.train_split, tune.data.eval_split, tune.data.test_split) == (
      "vtab/clevr_dist", "train800", "val200", "")
  assert (tune.optim.base_lr, tune.optim.weight_decay) == (2.5, 1e-3)
  assert tune.prompt.num_prompts == hparams.vpt_deep_prompts("clevr_dist") == 200
  assert "protocol" not in tune
  final = tuning.run_config(config, tuning.RunSpec("vtab/clevr_dist", "final", 2.5, 0.0, 800))
  assert (final.data.train_split, final.data.eval_split, final.data.test_split, final.seed) == (
      "train800val200", "", "test", 800)
  cub = tuning.run_config(protocol_config("tasks=fgvc/cub"),
                          tuning.RunSpec("fgvc/cub", "final", 1.0, 0.0, 42))
  assert (cub.data.train_split, cub.data.test_split, cub.data.preprocess) == (
      "train", "test", "resize_crop_flip")
  with pytest.raises(tuning.ProtocolError, match="tune_train_split"):
    tuning.plan(protocol_config("tasks=tfds:mnist"))
    tuning.splits(protocol_config("tasks=tfds:mnist"), "tfds:mnist")


def _records(scores, lrs=(1.0, 0.5, 0.25), wds=(0.01, 0.001)):
  out = []
  for lr in lrs:
    for wd in wds:
      score = scores.get((lr, wd), 0.1)
      record = (None if score is None else
                {"status": "diverged"} if score == "nan" else
                {"status": "finished", "results": {"val": {"top1": score}}})
      out.append((tuning.RunSpec("vtab/dmlab", "tune", lr, wd), record))
  return out


def test_selection_ties_go_to_the_smaller_lr():
  best = tuning.select(_records({(1.0, 0.01): 0.8, (0.5, 0.001): 0.9, (0.25, 0.01): 0.9}))
  assert (best["lr"], best["weight_decay"], best["val_top1"]) == (0.25, 0.01, 0.9)
  # Equal scores at one lr: the first visited (larger) weight decay stays.
  best = tuning.select(_records({(0.5, 0.01): 0.9, (0.5, 0.001): 0.9}))
  assert (best["lr"], best["weight_decay"]) == (0.5, 0.01)
  # A higher score wins whatever its lr; diverged runs score nothing.
  best = tuning.select(_records({(1.0, 0.001): 0.95, (0.25, 0.01): "nan"}))
  assert (best["lr"], best["weight_decay"]) == (1.0, 0.001)
  assert tuning.select(_records({(0.5, 0.01): None})) is None  # a run is missing
  with pytest.raises(tuning.ProtocolError, match="diverged"):
    tuning.select(_records({k: "nan" for k in [(1.0, 0.01), (1.0, 0.001), (0.5, 0.01),
                                                (0.5, 0.001), (0.25, 0.01), (0.25, 0.001)]}))


# ----------------------------------------------------------------- running it

SMALL = dict(**{"protocol.lrs": (1.0, 0.5), "protocol.weight_decays": (1e-3, 0.0),
                "protocol.seeds": (42, 44)})


def test_protocol_with_a_stub_selects_retrains_and_summarizes(tmp_path):
  config = protocol_config("method=vpt_deep,tasks=dmlab+eurosat", **SMALL)
  stub = StubRun(val={(0.5, 0.0): 0.7, (1.0, 1e-3): 0.7})
  summaries = tuning.run_protocol(config, str(tmp_path), stub)
  assert len(stub.calls) == 2 * (4 + 2)
  finals = [c for c, _ in stub.calls if c.data.train_split == "train800val200"]
  assert {(c.optim.base_lr, c.optim.weight_decay) for c in finals} == {(0.5, 0.0)}
  assert sorted(c.seed for c in finals) == [42, 42, 44, 44]
  dmlab = summaries[0]
  assert dmlab["complete"] and dmlab["best"] == {"lr": 0.5, "weight_decay": 0.0,
                                                 "val_top1": 0.7}
  tests = [0.5042, 0.5044]
  assert dmlab["test_top1_mean"] == pytest.approx(np.mean(tests))
  assert dmlab["test_top1_std"] == pytest.approx(np.std(tests))  # population std
  summary_path = tmp_path / "vtab" / "dmlab" / "vpt_deep" / "summary.json"
  assert json.loads(summary_path.read_text()) == dmlab
  run_dir = tmp_path / "vtab" / "eurosat" / "vpt_deep" / "final" / "seed44"
  assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
  assert (tmp_path / "report" / "report.md").exists()


def test_rerun_skips_finished_runs_and_resumes_the_rest(tmp_path):
  config = protocol_config("tasks=dmlab", **SMALL)
  interrupted = StubRun(fail_after=3)
  with pytest.raises(KeyboardInterrupt):
    tuning.run_protocol(config, str(tmp_path), interrupted, write_report=False)
  resumed = StubRun()
  tuning.run_protocol(config, str(tmp_path), resumed, write_report=False)
  assert len(resumed.calls) == 4 + 2 - 3
  again = StubRun()
  tuning.run_protocol(config, str(tmp_path), again, write_report=False)
  assert again.calls == []
  changed = protocol_config("tasks=dmlab", **SMALL, **{"optim.epochs": 50})
  with pytest.raises(tuning.ProtocolError, match="different config.*optim.epochs"):
    tuning.run_protocol(changed, str(tmp_path), StubRun(), write_report=False)


def test_neutral_fields_may_change_between_reruns(tmp_path):
  config = protocol_config("tasks=dmlab", **SMALL)
  tuning.run_protocol(config, str(tmp_path), StubRun(), write_report=False)
  # Where the data lives and how evaluation batches it do not change a result.
  moved = protocol_config("tasks=dmlab", **SMALL, **{
      "data.data_dir": "/elsewhere", "eval.batch_size": 7, "checkpoint.keep": 9})
  again = StubRun()
  tuning.run_protocol(moved, str(tmp_path), again, write_report=False)
  assert again.calls == []
  # Records written with "/"-joined keys (and the neutral fields in them) still match.
  for run_json in tmp_path.glob("**/run.json"):
    record = json.loads(run_json.read_text())
    record["config"] = {k.replace(".", "/"): v for k, v in record["config"].items()}
    record["config"]["eval/batch_size"] = 1
    run_json.write_text(json.dumps(record))
  tuning.run_protocol(config, str(tmp_path), again, write_report=False)
  assert again.calls == []


def test_diverged_grid_points_are_recorded_not_fatal(tmp_path, capsys):
  config = protocol_config("tasks=dmlab", **SMALL)
  summary, = tuning.run_protocol(config, str(tmp_path), StubRun(diverge_lr=1.0),
                                 write_report=False)
  assert summary["best"]["lr"] == 0.5 and summary["complete"]
  assert [g["status"] for g in summary["grid"]] == ["diverged", "diverged", "finished",
                                                    "finished"]
  assert "diverged" in capsys.readouterr().err


def test_shards_split_the_runs_and_finals_wait_for_the_grid(tmp_path, capsys):
  def config(i):
    return protocol_config("tasks=dmlab+eurosat", **SMALL, **{"protocol.shard": f"{i}/3"})
  stubs = [StubRun() for _ in range(3)]
  for i, stub in enumerate(stubs):
    tuning.run_protocol(config(i), str(tmp_path), stub, write_report=False)
  assert "waiting for other jobs' grid runs of: vtab/dmlab" in capsys.readouterr().out
  # A second pass runs the finals that waited; nothing runs twice.
  again = [StubRun() for _ in range(3)]
  for i, stub in enumerate(again):
    summaries = tuning.run_protocol(config(i), str(tmp_path), stub, write_report=False)
  assert all(s["complete"] for s in summaries)
  dirs = [d for stub in stubs + again for _, d in stub.calls]
  assert len(dirs) == len(set(dirs)) == len(tuning.plan(config(0))) == 12
  # Each job ran exactly the runs with index = its shard mod 3.
  plan = tuning.plan(config(0))
  for i in range(3):
    mine = {os.path.join(str(tmp_path), plan[k].folder("vpt_deep"))
            for k in range(len(plan)) if k % 3 == i}
    assert {d for _, d in stubs[i].calls + again[i].calls} == mine
  with pytest.raises(tuning.ProtocolError, match="i/n"):
    tuning.parse_shard("3/3")


# ----------------------------------------------------------------- the report

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


# ----------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
  return checkpoint_fixtures.write_tiny_backbone(
      tmp_path_factory.mktemp("backbone") / "ViT-test_4.npz")


def test_tiny_protocol_end_to_end(backbone, tmp_path):
  """2 x 1 grid and 2 seeds of real training on a locally built dataset."""
  config = protocol_config("method=vpt_deep,tasks=tfds:vpt_sprites/tiny", **{
      "model.variant": "test/4", "model.image_size": 32, "model.init_checkpoint": backbone,
      "prompt.num_prompts": 2, "data.data_dir": str(tmp_path / "tfds"),
      "data.label_key": "count", "optim.batch_size": 8, "optim.epochs": 2,
      "optim.warmup_epochs": 1, "eval.batch_size": 8, "log_every_steps": 1,
      "protocol.lrs": (2.0, 0.5), "protocol.weight_decays": (1e-4,),
      "protocol.seeds": (42, 44), "protocol.tune_train_split": "train[:16]",
      "protocol.tune_eval_split": "validation", "protocol.final_train_split": "train",
      "protocol.final_test_split": "test"})
  calls = []

  def counted(run_config, run_dir):
    calls.append(run_dir)
    return trainer.train_and_evaluate(run_config, run_dir)
  workdir = str(tmp_path / "protocol")
  summary, = tuning.run_protocol(config, workdir, counted)
  assert len(calls) == 4 and summary["complete"]
  assert summary["best"]["lr"] in (2.0, 0.5)
  assert [f["seed"] for f in summary["finals"]] == [42, 44]
  for run_dir in calls:
    for name in ("config.json", "metrics.jsonl", "results.json", "run.json",
                 "export/task.npz", "export/task.json"):
      assert os.path.exists(os.path.join(run_dir, name)), (run_dir, name)
  final = json.load(open(os.path.join(calls[-1], "results.json")))
  assert final["test"]["count"] == 10 and "val" not in final
  assert summary["test_top1_mean"] == pytest.approx(np.mean(
      [json.load(open(os.path.join(d, "results.json")))["test"]["top1"] for d in calls[2:]]))
  assert os.path.exists(os.path.join(workdir, "report", "curves_vpt_deep.png"))
  # The same command through the CLI resumes: nothing trains again.
  assert cli.run(config, workdir)[0] == summary
  assert os.path.exists(cli.run(config, workdir, "report"))
