"""The tuning protocol with a stubbed run function (selection, seeds, resume, shards),
and one tiny real protocol end to end."""

import json
import os

import numpy as np
import pytest

import checkpoint_fixtures
import protocol_fixtures
from vpt_jax import cli
from vpt_jax.protocol import run_plan
from vpt_jax.protocol import tuning
from vpt_jax.training import trainer

protocol_config = protocol_fixtures.protocol_config
StubRun = protocol_fixtures.StubRun
SMALL = protocol_fixtures.SMALL


# ----------------------------------------------------------------- running it

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
  with pytest.raises(run_plan.ProtocolError, match="different config.*optim.epochs"):
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
  assert len(dirs) == len(set(dirs)) == len(run_plan.plan(config(0))) == 12
  # Each job ran exactly the runs with index = its shard mod 3.
  plan = run_plan.plan(config(0))
  for i in range(3):
    mine = {os.path.join(str(tmp_path), plan[k].folder("vpt_deep"))
            for k in range(len(plan)) if k % 3 == i}
    assert {d for _, d in stubs[i].calls + again[i].calls} == mine
  with pytest.raises(run_plan.ProtocolError, match="i/n"):
    run_plan.parse_shard("3/3")


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
