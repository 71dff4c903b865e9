"""run.py: config strings, overrides and every mode, on a tiny local run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import checkpoint_fixtures
import tolerances
from configs import vpt as vpt_config
from vpt_jax import cli
from vpt_jax import errors
from vpt_jax.export import merging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Trains a tiny VPT-deep run through `python run.py` (flags and all)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vpt_jax.models import vit  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("cli")
  backbone = str(root / "backbone.npz")
  model = vit.VisionTransformer(num_classes=3, variant="test/4")
  checkpoint_fixtures.write_vit_raw_npz(
      model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"], backbone)
  arg = (f"method=vpt_deep,num_prompts=2,variant=test/4,image_size=32,"
         f"builder=vpt_sprites/tiny,checkpoint={backbone},runlocal")
  flags = [f"--config=configs/vpt.py:{arg}", f"--workdir={root / 'run'}",
           f"--config.data.data_dir={root / 'tfds'}", "--config.data.label_key=shape",
           "--config.data.train_split=train", "--config.data.test_split=test",
           "--config.optim.base_lr=0.5"]
  out = subprocess.run([sys.executable, "run.py", *flags], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return root, arg, flags, out.stdout


def test_train_mode_prints_overview_progress_and_results(trained):
  root, _, _, stdout = trained
  assert "trainable:" in stdout and "% of the" in stdout  # parameter overview
  assert "step 6/6" in stdout and "lr " in stdout and "loss " in stdout
  assert "test top-1" in stdout
  with open(root / "run" / "config.json") as f:
    config = json.load(f)
  assert config["optim"]["base_lr"] == 0.5 and config["method"] == "vpt_deep"


def _config(root, arg, **predict):
  config = vpt_config.get_config(arg)
  config.unlock()
  config.data.data_dir = str(root / "tfds")
  config.data.label_key = "shape"
  config.data.train_split = "train"
  config.data.test_split = "test"
  config.optim.base_lr = 0.5
  config.predict.update(predict)
  config.lock()
  return config


def test_evaluate_export_and_predict_modes(trained, tmp_path):
  root, arg, _, _ = trained
  workdir = str(root / "run")
  with open(os.path.join(workdir, "results.json")) as f:
    trained_results = json.load(f)
  evaluated = cli.run(_config(root, arg), workdir, "evaluate")
  assert evaluated["test"] == trained_results["test"]
  assert cli.run(_config(root, arg), workdir, "export") == os.path.join(workdir, "export")

  paths = []
  for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
    image = np.zeros((20, 24, 3), np.uint8)
    image[5:15, 6:18] = colour
    paths.append(str(tmp_path / f"image{i}.png"))
    Image.fromarray(image).save(paths[-1])
  predictions = cli.run(_config(root, arg, images=",".join(paths)), workdir, "predict")
  assert [p["file"] for p in predictions] == paths
  for prediction in predictions:
    probabilities = [p for _, p in prediction["classes"]]
    # Top-5 of the 5 shape classes: the whole distribution.
    assert len(probabilities) == 5 and abs(sum(probabilities) - 1) < 1e-5
    assert {name for name, _ in prediction["classes"]} <= {
        "square", "ellipse", "triangle", "cross", "heart"}
    # The same record as serving's: the top class first, probabilities descending.
    assert probabilities == sorted(probabilities, reverse=True)
    assert [prediction["class"], prediction["probability"]] == prediction["classes"][0]


def test_predict_names_a_missing_image(trained):
  root, arg, _, _ = trained
  with pytest.raises(ValueError, match="does not exist"):
    cli.run(_config(root, arg, images="/nonexistent.png"), str(root / "run"), "predict")


def test_misspelt_config_key_is_refused(trained):
  root, _, flags, _ = trained
  out = subprocess.run([sys.executable, "run.py", *flags, "--config.optim.base_learning_rate=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "unknown config key 'optim.base_learning_rate'" in out.stderr
  assert "did you mean optim.base_lr" in out.stderr


def test_bad_config_arguments_name_the_closest_valid_key():
  problem = cli.check_command_line(["--config=configs/vpt.py:methd=vpt_deep", "--workdir=/x"])
  assert "Unknown config argument 'methd' (did you mean 'method'?)" in problem
  problem = cli.check_command_line(["--config", "configs/vpt.py", "--config.optim.base_lrate=1"])
  assert "unknown config key 'optim.base_lrate'" in problem and "optim.base_lr" in problem
  assert cli.check_command_line(["--config=configs/vpt.py", "--config.optim.base_lr=1"]) is None
  assert "does not exist" in cli.check_command_line(["--config=configs/nope.py"])


def test_cpu_devices_splits_the_host_and_refuses_to_come_late():
  """--cpu_devices N gives N XLA devices; after JAX made its backends it is an error."""
  script = ("from vpt_jax import cli\n"
            "cli.set_cpu_devices(2)\n"
            "import jax\n"
            "print(jax.device_count())\n"
            "try:\n"
            "  cli.set_cpu_devices(3)\n"
            "except RuntimeError as e:\n"
            "  print('refused:', e)\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = result.stdout.splitlines()
  assert lines[0] == "2"
  assert lines[1].startswith("refused: --cpu_devices=3 came too late")


def test_vpt_jax_prefix_names_a_shipped_config():
  folder = os.path.join(REPO, "configs")  # a checkout: configs/ beside the package
  assert cli.shipped_configs_dir() == folder
  assert cli.resolve_config_spec("vpt_jax:quickstart:ci") == f"{folder}/quickstart.py:ci"
  assert cli.resolve_config_spec("vpt_jax:vpt.py") == f"{folder}/vpt.py"
  assert cli.resolve_config_spec("configs/vpt.py:method=linear") == "configs/vpt.py:method=linear"
  with pytest.raises(ValueError, match=r"no shipped config 'quikstart'.*quickstart.*vpt"):
    cli.resolve_config_spec("vpt_jax:quikstart")
  argv = ["run.py", "--config=vpt_jax:vpt:method=linear", "--mode", "train"]
  assert cli.resolve_config_argv(argv) == [
      "run.py", f"--config={folder}/vpt.py:method=linear", "--mode", "train"]
  assert cli.resolve_config_argv(["run.py", "--config", "vpt_jax:vpt"]) == [
      "run.py", "--config", f"{folder}/vpt.py"]


def test_fingerprint_mode_matches_what_the_run_recorded(trained):
  root, arg, _, _ = trained
  workdir = str(root / "fingerprints")
  found = cli.run(_config(root, arg), workdir, "fingerprint")
  assert sorted(found) == ["test_split", "train_split"]  # no eval split set
  with open(root / "run" / "results.json") as f:
    recorded = json.load(f)["data"]  # written by the training subprocess
  assert found["train_split"] == recorded["train"] and found["test_split"] == recorded["test"]
  assert found["test_split"]["count"] == 10 and len(found["test_split"]["classes"]) == 5
  with open(os.path.join(workdir, "data_fingerprints.json")) as f:
    assert json.load(f) == found


def test_export_mode_writes_a_model_that_serves_without_vpt_jax(trained, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from vpt_jax.export import predict  # pylint: disable=g-import-not-at-top
  root, arg, _, _ = trained
  workdir = str(root / "run")
  config = _config(root, arg)
  with config.unlocked():
    config.export.format = "onnx"
  with pytest.raises(errors.UserError, match="unknown export.format 'onnx'"):
    cli.run(config, workdir, "export")  # refused before the checkpoint is read
  with config.unlocked():
    config.export.format = "stablehlo"
    config.export.platforms = "cpu"
  assert cli.run(config, workdir, "export") == os.path.join(workdir, "export")
  directory = os.path.join(workdir, "export", "stablehlo")
  with open(os.path.join(directory, "model.json")) as f:
    sidecar = json.load(f)
  assert sidecar["class_names"] == ["square", "ellipse", "triangle", "cross", "heart"]
  assert sidecar["image_size"] == 32 and sidecar["normalization"]["mean"] == [0.485, 0.456, 0.406]

  # The exported function's probabilities are predict mode's (the library's path).
  paths = []
  for i in range(2):
    image = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    paths.append(str(tmp_path / f"image{i}.png"))
    Image.fromarray(image).save(paths[-1])
  with open(os.path.join(directory, "model.stablehlo"), "rb") as f:
    exported = jax.export.deserialize(f.read())
  probabilities = np.asarray(exported.call(predict.read_images(paths, 32))["probabilities"])
  predictions = cli.run(_config(root, arg, images=",".join(paths)), workdir, "predict")
  assert [p["file"] for p in predictions] == paths  # the loops below compare every one
  for row, prediction in zip(probabilities, predictions):
    assert len(prediction["classes"]) == len(sidecar["class_names"])  # top 5 of 5
    for name, probability in prediction["classes"]:
      # Two float32 programs of a 2-block ViT (4 chained sums per block, of at most
      # 1 + 2 + 64 tokens, activations of order 1): a softmax moves by at most
      # its logits' largest change.
      atol = tolerances.rounding_atol(1.0, reduction_length=67, steps=2 * 4)
      assert abs(row[sidecar["class_names"].index(name)] - probability) <= atol


def test_merged_export_of_a_prompt_method_is_refused_before_compute(trained):
  root, arg, _, _ = trained
  config = _config(root, arg)
  with config.unlocked():
    config.export.merged = True
  with pytest.raises(merging.MergeError, match="'vpt_deep' cannot merge"):
    cli.run(config, str(root / "run"), "export")


def test_fingerprint_mode_refuses_a_bad_data_config_as_a_user_error(tmp_path):
  config = vpt_config.get_config("builder=dmlab,checkpoint=")
  config.data.task = "nonsense/task"
  with pytest.raises(errors.UserError, match=r"Unknown data.task 'nonsense/task'"):
    cli.run(config, str(tmp_path / "run"), "fingerprint")
  assert not os.path.exists(tmp_path / "run")  # refused before anything is written
