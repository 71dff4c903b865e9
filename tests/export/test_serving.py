"""Serving from the command line: bad requests, run.py --mode=predict --tasks=..., CSV inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import export_fixtures
from vpt_jax import cli
from vpt_jax.export import predict
from vpt_jax.export import serving
from vpt_jax.export import task_export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = export_fixtures.IMAGE
_alone = export_fixtures.single_task_logits
_images = export_fixtures.random_images
_pngs = export_fixtures.write_pngs
workspace = export_fixtures.workspace


def test_bad_requests_name_the_problem(workspace):
  _, backbone, exports = workspace
  server = serving.MultiTaskServer({"a": exports["a"]}, backbone)
  with pytest.raises(ValueError, match=r"unknown task 'z'; this server has \['a'\]"):
    server.logits(_images(1), ["z"])
  with pytest.raises(ValueError, match="images must be"):
    server.logits(_images(1)[:, :8], ["a"])
  with pytest.raises(ValueError, match="2 images but 1 task names"):
    server.logits(_images(2), ["a"])
  with pytest.raises(ValueError, match="must be name=export_dir"):
    cli.parse_task_exports("a:/x")
  with pytest.raises(ValueError, match="must be task:image_path"):
    cli.parse_predict_inputs("a.png")


@pytest.mark.numerics
def test_run_py_predicts_many_tasks(workspace, tmp_path):
  _, backbone, exports = workspace
  paths = _pngs(tmp_path, 3)
  exports = {name: exports[name] for name in ("a", "b")}
  inputs = [("b", paths[0]), ("a", paths[1]), ("b", paths[2]), ("a", paths[0])]
  output = tmp_path / "predictions.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  out = subprocess.run(
      [sys.executable, "run.py", "--mode=predict",
       "--tasks=" + ",".join(f"{k}={v}" for k, v in exports.items()),
       "--inputs=" + ",".join(f"{t}:{p}" for t, p in inputs),
       f"--backbone={backbone}", f"--output={output}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [json.loads(line) for line in output.read_text().splitlines()] == lines
  assert [(r["task"], r["file"]) for r in lines] == inputs
  for (task, path), result in zip(inputs, lines):
    metadata, _ = task_export.read_export(exports[task])
    logits = _alone(exports[task], backbone, predict.read_images([path], IMAGE))[0]
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    names = metadata["class_names"]
    assert result["class"] == names[int(np.argmax(expected))]
    assert result["probability"] == pytest.approx(expected.max(), abs=1e-5)
    # Top-5 of at most 5 classes: the task's whole distribution, no padded class.
    assert len(result["classes"]) == len(names)
    for name, probability in result["classes"]:
      assert probability == pytest.approx(expected[names.index(name)], abs=1e-5)


def test_csv_inputs_and_unknown_tasks(workspace, tmp_path):
  _, backbone, exports = workspace
  paths = _pngs(tmp_path, 2)
  table = tmp_path / "inputs.csv"
  table.write_text(f"task,file\nc,{paths[0]}\na,{paths[1]}\n")
  assert cli.parse_predict_inputs(str(table)) == [("c", paths[0]), ("a", paths[1])]
  with pytest.raises(ValueError, match=r"names tasks \['zz'\] that --tasks does not load"):
    cli.predict_tasks(f"a={exports['a']}", f"zz:{paths[0]}", backbone)


def test_run_py_refuses_serving_flags_without_tasks(tmp_path):
  out = subprocess.run(
      [sys.executable, "run.py", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
       "--mode=predict", "--inputs=a:x.png", f"--output={tmp_path / 'p.jsonl'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"))
  assert out.returncode != 0
  assert "pass them with --mode=predict --tasks=" in out.stderr
  assert not list(tmp_path.iterdir())  # refused before anything was written
