"""Many task exports on one backbone: mixed batches equal each task run alone."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import tolerances
import checkpoint_fixtures as fixtures
from vpt_jax import cli
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.export import predict
from vpt_jax.export import serving
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.models import vit_family
from vpt_jax.params import freezing
from vpt_jax.params import trees

pytestmark = pytest.mark.numerics  # run again under SSE4.2 in CI

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANT = "test/4"
IMAGE = 16
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _spec(method, image_size=IMAGE, **overrides):
  return factory.model_spec(fixtures.method_config(
      method, VARIANT, image_size, num_prompts=2, **{"lora.rank": 2, **overrides}))


def _write_export(directory, backbone, method, num_classes, seed, *, normalization=HALF,
                  image_size=IMAGE, fingerprint=None, **overrides):
  """An export with random trained leaves, written by the real export function.

  Every trained leaf (prompts, head, LoRA factors, biases, ...) gets random
  values, so no task sits at an initialisation another task shares.
  """
  spec = _spec(method, image_size, **overrides)
  model = factory.build_model(spec, num_classes)
  shapes = factory.variable_shapes(model, image_size)  # traced only: no compile
  rules = registry.get_method(spec["method"]).rules(
      vit_family.block_patterns(VARIANT), r"Transformer/encoder_norm/.*")
  labels = freezing.label_params(shapes["params"], rules)
  flat_labels = trees.flatten(labels)
  trained = fixtures.randomize(shapes["params"], seed=seed)
  params = trees.unflatten({
      path: trees.flatten(trained)[path] if flat_labels[path] == "train" else shape
      for path, shape in trees.flatten(shapes["params"]).items()})
  batch_stats = None
  if "batch_stats" in shapes:  # MLP-k: running variances must be positive
    batch_stats = jax.tree.map(lambda x: np.abs(x) + 0.5,
                               fixtures.randomize(shapes["batch_stats"], seed=seed + 1))
  return task_export.export_task(
      str(directory), params, labels, spec=spec, num_classes=num_classes,
      class_names=[f"c{seed}_{i}" for i in range(num_classes)], normalization=normalization,
      backbone_path=backbone, init_seed=0, batch_stats=batch_stats,
      backbone_fingerprint=fingerprint or task_export.npz_lib.fingerprint(backbone))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("serving")
  backbone = fixtures.write_tiny_backbone(root / "backbone.npz", image_size=IMAGE, seed=3)
  exports = {
      # One structure, three class counts, two normalisations; "b" trained with
      # another prompt dropout (training-only: it still shares the forward).
      "a": _write_export(root / "a", backbone, "vpt_deep", 3, 10),
      "b": _write_export(root / "b", backbone, "vpt_deep", 5, 11, normalization=IMAGENET,
                         **{"prompt.dropout": 0.0}),
      "c": _write_export(root / "c", backbone, "vpt_deep", 2, 12),
  }
  return root, backbone, exports


_ALONE = {}


def _alone(directory, backbone, images):
  """The normal single-task path: load_task_variables, normalise, apply; one image at a time."""
  if directory not in _ALONE:
    model, variables, metadata = task_export.load_task_variables(directory, backbone)
    norm = metadata["normalization"]
    _ALONE[directory] = jax.jit(lambda v, x: model.apply(
        v, normalization_lib.normalize_images(x, norm["mean"], norm["std"]))), variables
  apply, variables = _ALONE[directory]
  return np.stack([np.asarray(apply(variables, image[None]))[0] for image in images])


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, IMAGE, IMAGE, 3), dtype=np.uint8)


def _check_mixed_batch(server, exports, backbone, tasks, images):
  logits = server.logits(images, tasks)
  assert logits.shape == (len(tasks), max(server.num_classes(t) for t in set(exports)))
  for i, task in enumerate(tasks):
    classes = server.num_classes(task)
    expected = _alone(exports[task], backbone, images[i:i + 1])[0]
    assert expected.shape == (classes,)
    # Batched with other tasks, the sums run in other orders: 2 blocks (test/4
    # has 4; 4 chained sums each) of sums at most 1 + 3 + 16 tokens long.
    atol = tolerances.rounding_atol(max(np.max(np.abs(expected)), 1.0), reduction_length=20,
                                    steps=4 * 4)
    np.testing.assert_allclose(logits[i, :classes], expected, rtol=0, atol=atol)
    assert np.all(np.isneginf(logits[i, classes:]))


def test_mixed_batch_equals_each_task_alone(workspace):
  _, backbone, exports = workspace
  server = serving.MultiTaskServer(exports, backbone)
  assert len(server.groups) == 1  # one stacked tree, one forward for all three
  tasks = ["a", "b", "c", "b", "a", "c", "c"]
  _check_mixed_batch(server, exports, backbone, tasks, _images(len(tasks)))
  # The backbone is held once; the tasks add their prompts and padded heads.
  memory = server.memory()
  width, depth, prompts = 16, 2, 2
  assert memory["task_bytes"] == 4 * 3 * (depth * prompts * width + width * 5 + 5)
  backbone_params = sum(v.size for k, v in task_export.npz_lib.read_npz(backbone).items()
                        if not k.startswith(("head", "pre_logits")))
  assert memory["backbone_bytes"] == 4 * backbone_params  # once, not per task


def test_backbone_matmuls_are_batched_not_looped(workspace):
  _, backbone, exports = workspace
  server = serving.MultiTaskServer(exports, backbone)
  group = server.groups[0]
  batch = 3
  fused = group.lower(_images(batch), np.array([0, 1, 2])).compile().as_text()
  assert " while(" not in fused  # no loop over the examples
  # Every backbone projection is one matmul whose rows are all examples' tokens
  # (e.g. f32[3 x 17, 32] = dot(tokens, kernel)) with the kernel unbatched: no
  # per-example copy of a backbone weight, and no unrolled per-example matmuls
  # (those would number batch x depth x 6).
  projections = [line for line in fused.splitlines() if " dot(" in line and re.search(
      r"/(MlpBlock_0/Dense_\d|MultiHeadDotProductAttention_0/(query|key|value|out))/", line)]
  depth = 2
  assert len(projections) == depth * 6
  assert not any("lhs_batch_dims" in line or "rhs_batch_dims" in line for line in projections)


def test_structures_are_grouped_and_each_example_matches(workspace):
  root, backbone, exports = workspace
  exports = {
      "a": exports["a"], "b": exports["b"],
      "deep3": _write_export(root / "deep3", backbone, "vpt_deep", 4, 20,
                             **{"prompt.num_prompts": 3}),
      "mlp": _write_export(root / "mlp", backbone, "mlp-2", 3, 21),      # BatchNorm head
      "bitfit": _write_export(root / "bitfit", backbone, "bias", 6, 22),  # backbone biases
      "lora": _write_export(root / "lora", backbone, "lora", 2, 23),
  }
  server = serving.MultiTaskServer(exports, backbone)
  assert sorted(sorted(g.task_names) for g in server.groups) == [
      ["a", "b"], ["bitfit"], ["deep3"], ["lora"], ["mlp"]]
  tasks = ["lora", "a", "bitfit", "mlp", "deep3", "b", "bitfit", "a", "mlp"]
  _check_mixed_batch(server, exports, backbone, tasks, _images(len(tasks), seed=1))


def test_backbone_mismatch_is_refused_naming_the_task(workspace, tmp_path):
  _, backbone, exports = workspace
  other = fixtures.write_tiny_backbone(tmp_path / "other.npz", image_size=IMAGE, seed=4)
  stale = _write_export(tmp_path / "stale", other, "vpt_deep", 3, 30)
  with pytest.raises(serving.ExportError, match=r"Backbone mismatch: task 'stale'"):
    serving.MultiTaskServer({"a": exports["a"], "stale": stale}, backbone)


@pytest.mark.parametrize("method", ["partial-1", "full"])
def test_exports_that_trained_backbone_weights_are_refused(workspace, tmp_path, method):
  _, backbone, exports = workspace
  tuned = _write_export(tmp_path / "tuned", backbone, method, 3, 40)
  with pytest.raises(serving.ExportError,
                     match=rf"task 'tuned' .*{method}.* trained backbone weights"):
    serving.MultiTaskServer({"a": exports["a"], "tuned": tuned}, backbone)


def test_different_image_sizes_are_refused(workspace, tmp_path):
  _, backbone, exports = workspace
  small = _write_export(tmp_path / "small", backbone, "vpt_deep", 3, 50, image_size=8)
  with pytest.raises(serving.ExportError, match="tasks differ in image_size"):
    serving.MultiTaskServer({"a": exports["a"], "small": small}, backbone)


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


def _pngs(directory, n):
  paths = []
  for i, image in enumerate(_images(n, seed=7)):
    paths.append(str(directory / f"image{i}.png"))
    Image.fromarray(image).save(paths[-1])
  return paths


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
