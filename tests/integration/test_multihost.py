"""Two processes on localhost (jax.distributed over gloo), each feeding its own
half of every global batch, holding half of the optimizer state and evaluating its
own share of the test set, end with the parameters and the test results of one
process."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import tolerances
import checkpoint_fixtures
import run_fixtures
from vpt_jax.data import local_builders  # pylint: disable=unused-import
from vpt_jax.export import task_export
from vpt_jax.models import vit
from vpt_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.numerics
@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
  backbone = str(tmp_path / "backbone.npz")
  model = vit.VisionTransformer(num_classes=3, variant="test/4")
  checkpoint_fixtures.write_vit_raw_npz(
      model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"], backbone)
  data_dir = str(tmp_path / "tfds")
  # Built once up front: two processes must not prepare the same dataset at once.
  tfds.builder("vpt_sprites/tiny", data_dir=data_dir).download_and_prepare()
  config_spec = (f"configs/vpt.py:method=vpt_deep,num_prompts=2,variant=test/4,image_size=32,"
                 f"builder=vpt_sprites/tiny,checkpoint={backbone},runlocal")
  overrides = {"data.data_dir": data_dir, "data.label_key": "shape",
               "data.train_split": "train", "data.test_split": "test",
               "optim.base_lr": 0.5, "optim.warmup_epochs": 0}
  # The two processes also split the optimizer state between them (ZeRO-1):
  # placed from host arrays by callbacks, saved in two halves, the same math.
  common = [sys.executable, "run.py", f"--config={config_spec}",
            *[f"--config.{key}={value}" for key, value in overrides.items()],
            "--config.optim.shard_state=True"]
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""), JAX_PLATFORMS="cpu")

  # The single-process reference runs in this process (no subprocess start-up):
  # the same config, the same trainer as run.py.
  trainer.train_and_evaluate(run_fixtures.run_py_config(config_spec, overrides),
                             str(tmp_path / "single"))

  port = _free_port()
  workers = [subprocess.Popen(
      common + [f"--workdir={tmp_path / 'multi'}", "--distributed",
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  outputs = [w.communicate(timeout=600) for w in workers]
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  assert "on 2 device(s)" in outputs[0][0]

  _, expected = task_export.read_export(str(tmp_path / "single" / "export"))
  _, found = task_export.read_export(str(tmp_path / "multi" / "export"))
  assert sorted(found) == sorted(expected)
  # Only the order of the gradient sum differs (two partial sums): sums over
  # batch x tokens (8 x (1 + 2 + 64)), 6 steps (2 epochs of 3).
  atol = tolerances.rounding_atol(tolerances.largest_magnitude(expected),
                                  reduction_length=8 * 67, steps=6)
  for path in expected:
    np.testing.assert_allclose(found[path], expected[path], rtol=0, atol=atol, err_msg=path)

  # The evaluation: each process scores its own share, and the results count every
  # test image once (vpt_sprites/tiny's test split: 10), with the single run's scores.
  results = {}
  for name in ("single", "multi"):
    with open(tmp_path / name / "results.json") as f:
      results[name] = json.load(f)["test"]
  assert results["multi"]["count"] == results["single"]["count"] == 10
  # The parameters differ by at most atol (float rounding): the argmax of a near-tie
  # may flip, the mean loss moves by the same order as the logits, well under 1e-3.
  assert abs(results["multi"]["top1"] - results["single"]["top1"]) <= tolerances.one_example(10)
  np.testing.assert_allclose(results["multi"]["loss"], results["single"]["loss"], rtol=1e-3)
