"""Task exports written by the real export function on a tiny backbone, and the
single-task path the serving tests compare the multi-task server with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import checkpoint_fixtures as fixtures
import tolerances
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.models import vit_family
from vpt_jax.params import freezing
from vpt_jax.params import trees

VARIANT = "test/4"
IMAGE = 16
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def export_spec(method, image_size=IMAGE, **overrides):
  """The model spec of a tiny ``method`` model (2 prompts, LoRA rank 2)."""
  return factory.model_spec(fixtures.method_config(
      method, VARIANT, image_size, num_prompts=2, **{"lora.rank": 2, **overrides}))


def write_export(directory, backbone, method, num_classes, seed, *, normalization=HALF,
                 image_size=IMAGE, fingerprint=None, **overrides):
  """An export with random trained leaves, written by the real export function.

  Every trained leaf (prompts, head, LoRA factors, biases, ...) gets random
  values, so no task sits at an initialisation another task shares.
  """
  spec = export_spec(method, image_size, **overrides)
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


def write_workspace(root):
  """(root, backbone path, {task: export directory}) of three exports of one structure."""
  backbone = fixtures.write_tiny_backbone(root / "backbone.npz", image_size=IMAGE, seed=3)
  exports = {
      # One structure, three class counts, two normalisations; "b" trained with
      # another prompt dropout (training-only: it still shares the forward).
      "a": write_export(root / "a", backbone, "vpt_deep", 3, 10),
      "b": write_export(root / "b", backbone, "vpt_deep", 5, 11, normalization=IMAGENET,
                        **{"prompt.dropout": 0.0}),
      "c": write_export(root / "c", backbone, "vpt_deep", 2, 12),
  }
  return root, backbone, exports


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """``write_workspace`` once per test module (assign it in the module to use it)."""
  return write_workspace(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def two_structure_workspace(tmp_path_factory):
  """``write_workspace``'s tasks a, b, c (VPT-deep) and d (LoRA, 4 classes: a second
  structure group), once per test module."""
  root, backbone, exports = write_workspace(tmp_path_factory.mktemp("standalone"))
  exports["d"] = write_export(root / "d", backbone, "lora", 4, 13)
  return root, backbone, exports


# export directory -> (jitted single-task apply, its variables)
_ALONE = {}


def single_task_logits(directory, backbone, images):
  """The normal single-task path: load_task_variables, normalise, apply; one image at a time."""
  if directory not in _ALONE:
    model, variables, metadata = task_export.load_task_variables(directory, backbone)
    norm = metadata["normalization"]
    _ALONE[directory] = jax.jit(lambda v, x: model.apply(
        v, normalization_lib.normalize_images(x, norm["mean"], norm["std"]))), variables
  apply, variables = _ALONE[directory]
  return np.stack([np.asarray(apply(variables, image[None]))[0] for image in images])


def random_images(n, seed=0):
  """uint8 (n, IMAGE, IMAGE, 3) random pixels."""
  return np.random.default_rng(seed).integers(0, 256, (n, IMAGE, IMAGE, 3), dtype=np.uint8)


def batched_logits_atol(expected) -> float:
  """The bound between a tiny-ViT task's logits computed alone and in another batch.

  Batched (with other tasks, or compiled as another program), the sums run in
  other orders: 2 blocks (test/4 has 4; 4 chained sums each) of sums at most
  1 + 3 + 16 tokens long.
  """
  return tolerances.rounding_atol(max(np.max(np.abs(expected)), 1.0), reduction_length=20,
                                  steps=4 * 4)


def check_mixed_batch(server, exports, backbone, tasks, images):
  """Asserts that the server's mixed batch gives each example its task's logits alone."""
  logits = server.logits(images, tasks)
  assert logits.shape == (len(tasks), max(server.num_classes(t) for t in set(exports)))
  for i, task in enumerate(tasks):
    classes = server.num_classes(task)
    expected = single_task_logits(exports[task], backbone, images[i:i + 1])[0]
    assert expected.shape == (classes,)
    np.testing.assert_allclose(logits[i, :classes], expected, rtol=0,
                               atol=batched_logits_atol(expected))
    assert np.all(np.isneginf(logits[i, classes:]))


def write_pngs(directory, n):
  """n random PNGs in ``directory``; returns their paths."""
  paths = []
  for i, image in enumerate(random_images(n, seed=7)):
    paths.append(str(directory / f"image{i}.png"))
    Image.fromarray(image).save(paths[-1])
  return paths


def softmax(logits):
  """float64 NumPy softmax of each row; -inf logits get probability 0."""
  logits = np.asarray(logits, np.float64)
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


def check_standalone_outputs(outputs, expected_logits):
  """Logits within the two-program rounding bound; probabilities their softmax."""
  atol = batched_logits_atol(expected_logits)
  np.testing.assert_allclose(outputs["logits"], expected_logits, rtol=0, atol=atol)
  assert outputs["logits"].dtype == outputs["probabilities"].dtype == np.float32
  # A softmax moves by at most the largest change of its logits' differences.
  np.testing.assert_allclose(outputs["probabilities"], softmax(expected_logits), rtol=0,
                             atol=2 * atol + 1e-6)


def check_stacked_outputs(outputs, exports, backbone, images, task_index):
  """Asserts a stacked model's outputs: each example its task's alone, -inf padded, NaN rows
  for task indices out of range; its first example called alone gives the same logits.

  ``exports``: {name: directory} in the model's task order.
  """
  names = list(exports)
  logits = outputs["all"]["logits"]
  assert logits.shape == (len(images), max(len(task_export.read_export(d)[0]["class_names"])
                                           for d in exports.values()))
  for i, k in enumerate(task_index):
    if not 0 <= k < len(names):
      assert np.all(np.isnan(logits[i])) and np.all(np.isnan(outputs["all"]["probabilities"][i]))
      continue
    expected = single_task_logits(exports[names[k]], backbone, images[i:i + 1])
    classes = expected.shape[1]
    check_standalone_outputs(
        {name: value[i:i + 1, :classes] for name, value in outputs["all"].items()}, expected)
    assert np.all(np.isneginf(logits[i, classes:]))
    assert np.all(outputs["all"]["probabilities"][i, classes:] == 0)
  if "one" in outputs:
    one = outputs["one"]["logits"][0]
    classes = np.isfinite(logits[0]).sum()
    np.testing.assert_allclose(one[:classes], logits[0, :classes], rtol=0,
                               atol=batched_logits_atol(logits[0, :classes]))


# Run first in a subprocess without the repository: fails unless vpt_jax is unimportable.
_WITHOUT_VPT_JAX = """
import sys
sys.path.append({site_packages!r})  # jax and TensorFlow, without .pth files (-S)
try:
  import vpt_jax
except ImportError:
  pass
else:
  raise SystemExit('vpt_jax is importable: ' + vpt_jax.__file__)
"""

# Runs each standalone model's sidecar "load" snippet on directory/inputs.npz,
# for the whole batch and its first example, into outputs_<all|one>.npz.
_CALL_SNIPPETS = """
import json
import numpy as np
for directory in sys.argv[1:]:
  with open(directory + '/model.json') as f:
    sidecar = json.load(f)
  lines = sidecar['load'].splitlines()
  namespace = {}
  exec('\\n'.join(lines[:-1]), namespace)  # the imports and the loading
  inputs = dict(np.load(directory + '/inputs.npz'))
  symbolic = sidecar['signature']['inputs'][0]['shape'][0] == 'b'
  for tag, count in (('all', None), ('one', 1))[:2 if symbolic else 1]:
    namespace.update({name: value[:count] for name, value in inputs.items()})
    exec(lines[-1], namespace)  # the call
    np.savez(directory + '/outputs_' + tag + '.npz',
             **{k: np.asarray(v) for k, v in namespace['outputs'].items()})
"""


def call_without_vpt_jax(directories, inputs, cwd):
  """Calls standalone models in a Python that has jax but not vpt_jax.

  ``python -I -S`` from ``cwd`` (outside the repository): no PYTHONPATH, no
  user or site .pth files (an editable install), only the site-packages
  folder of jax. Each model's sidecar "load" snippet runs as written on
  ``inputs`` (per directory: {input name: array}).

  Returns:
    Per directory (its sidecar, {"all": outputs of the whole batch, "one": of its
    first example (for a symbolic batch only)}).
  """
  site_packages = os.path.dirname(os.path.dirname(jax.__file__))
  for directory, arrays in zip(directories, inputs):
    np.savez(os.path.join(directory, "inputs.npz"), **arrays)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  script = _WITHOUT_VPT_JAX.format(site_packages=site_packages) + _CALL_SNIPPETS
  out = subprocess.run([sys.executable, "-I", "-S", "-c", script, *map(str, directories)],
                       cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  results = []
  for directory in directories:
    with open(os.path.join(directory, "model.json")) as f:
      sidecar = json.load(f)
    results.append((sidecar, {
        tag: dict(np.load(os.path.join(directory, f"outputs_{tag}.npz")))
        for tag in ("all", "one")
        if os.path.exists(os.path.join(directory, f"outputs_{tag}.npz"))}))
  return results


def toy_served(fn):
  """A ServedModel of ``fn(weights, images)``: weights {"w": (3,)}, images (B, 2, 2, 3) uint8."""
  from vpt_jax.export import stablehlo_export  # pylint: disable=g-import-not-at-top
  return stablehlo_export.ServedModel(
      fn=fn, weights={"w": jax.numpy.ones(3)}, inputs=(("images", (2, 2, 3), "uint8"),),
      num_classes=3, description={"tasks": [{"method": "toy"}]})


def host_callback_fn(weights, images):
  """A toy forward through a host callback (which has no serialised form)."""
  logits = jax.pure_callback(lambda x: np.asarray(x, np.float32),
                             jax.ShapeDtypeStruct(images.shape[:1] + (3,), np.float32),
                             images[:, 0, 0, :])
  return {"logits": logits * weights["w"]}


def python_int_batch_fn(weights, images):
  """A toy forward that needs a concrete batch size."""
  rows = int(images.shape[0])
  return {"logits": jax.numpy.zeros((rows, 3)) + weights["w"]}
