"""StableHLO exports: loaded and run where vpt_jax cannot be imported, they give our logits."""


import jax
import numpy as np
import pytest

import export_fixtures
from vpt_jax import errors
from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.export import stablehlo_export
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.methods import registry

IMAGE = export_fixtures.IMAGE


workspace = export_fixtures.two_structure_workspace


SINGLE_IMAGES = export_fixtures.random_images(3, seed=4)
STACKED_IMAGES = export_fixtures.random_images(7, seed=5)
# Mixed tasks of both structure groups; 4 and -1 name no task.
TASK_INDEX = np.asarray([3, 1, 0, 2, 3, 4, -1], np.int32)


@pytest.fixture(scope="module")
def served(workspace):
  """Task b alone and the four tasks stacked, written and called without vpt_jax.

  One subprocess for both (its start and jax import are most of its time).
  """
  root, backbone, exports = workspace
  single, stacked = root / "b_hlo", root / "stacked"
  stablehlo_export.write_stablehlo(stablehlo_export.single_task_model(exports["b"], backbone),
                                   str(single), platforms=("cpu", "tpu"))
  stablehlo_export.write_stablehlo(stablehlo_export.stacked_tasks_model(exports, backbone),
                                   str(stacked), platforms=("cpu",))
  results = export_fixtures.call_without_vpt_jax(
      [single, stacked],
      [{"images": SINGLE_IMAGES}, {"images": STACKED_IMAGES, "task_index": TASK_INDEX}], root)
  return dict(zip(("single", "stacked"), results))


@pytest.mark.numerics
def test_single_task_serves_without_vpt_jax(workspace, served):
  _, backbone, exports = workspace
  sidecar, outputs = served["single"]
  metadata, _ = task_export.read_export(exports["b"])
  assert sidecar["kind"] == "single_task" and sidecar["export_format"] == "stablehlo"
  assert sidecar["class_names"] == [f"c11_{i}" for i in range(5)]
  assert sidecar["image_size"] == IMAGE and sidecar["jax_version"] == jax.__version__
  assert sidecar["normalization"] == metadata["normalization"]  # ImageNet's, not HALF
  assert sidecar["backbone"]["sha256"] == npz_lib.fingerprint(backbone)
  assert sidecar["platforms"] == ["cpu", "tpu"]
  assert sidecar["signature"]["inputs"] == [
      {"name": "images", "shape": ["b", IMAGE, IMAGE, 3], "dtype": "uint8"}]
  assert [o["shape"] for o in sidecar["signature"]["outputs"]] == [["b", 5]] * 2
  assert len(sidecar["load"].splitlines()) == 3

  expected = export_fixtures.single_task_logits(exports["b"], backbone, SINGLE_IMAGES)
  export_fixtures.check_standalone_outputs(outputs["all"], expected)   # symbolic batch: 3 images, then 1
  export_fixtures.check_standalone_outputs(outputs["one"], expected[:1])


@pytest.mark.numerics
def test_stacked_tasks_serve_without_vpt_jax(workspace, served):
  _, backbone, exports = workspace
  sidecar, outputs = served["stacked"]
  assert sidecar["kind"] == "stacked_tasks" and sidecar["structure_groups"] == 2
  assert [t["name"] for t in sidecar["tasks"]] == ["a", "b", "c", "d"]
  assert [t["num_classes"] for t in sidecar["tasks"]] == [3, 5, 2, 4]
  assert sidecar["signature"]["inputs"][1] == {"name": "task_index", "shape": ["b"],
                                               "dtype": "int32"}
  export_fixtures.check_stacked_outputs(outputs, exports, backbone, STACKED_IMAGES,
                                        TASK_INDEX)


def test_bad_settings_are_one_line_errors():
  cases = [(("onnx", 0, "cpu"), "unknown export.format 'onnx'; choose one of npz"),
           (("stablehlo", -1, "cpu"), "export.batch_size=-1: use 0 for any batch size"),
           (("stablehlo", 0, "cpu,gpu"), "export.platforms='cpu,gpu': give a comma"),
           (("stablehlo", 0, ""), "export.platforms='': give")]
  for arguments, message in cases:
    with pytest.raises(errors.UserError, match=message) as raised:
      stablehlo_export.check_settings(*arguments)
    assert "\n" not in str(raised.value)
  assert stablehlo_export.check_settings("stablehlo", 8, "cpu, tpu") == ("cpu", "tpu")


def test_models_that_cannot_be_exported_are_refused_in_one_line():
  host_callback = export_fixtures.toy_served(export_fixtures.host_callback_fn)
  batch_as_python_int = export_fixtures.toy_served(export_fixtures.python_int_batch_fn)
  with pytest.raises(errors.UserError, match="the toy model cannot be serialised .* keep "
                     "the npz export") as raised:
    stablehlo_export.export_function(host_callback, 2, ("cpu",))
  assert "\n" not in str(raised.value)
  with pytest.raises(errors.UserError, match="cannot be exported for any batch size .* set a "
                     "fixed batch size, e.g. --config.export.batch_size=32") as raised:
    stablehlo_export.export_function(batch_as_python_int, 0, ("cpu",))
  assert "\n" not in str(raised.value)
  exported, _ = stablehlo_export.export_function(batch_as_python_int, 4, ("cpu",))
  assert exported.in_avals[0].shape == (4, 2, 2, 3)


@pytest.mark.parametrize("method", ["vfpt", "mlp-2", "cvpt"])
def test_methods_trace_with_abstract_weights_for_every_platform(method):
  # FFTs (VFPT), BatchNorm statistics (MLP-k), attention-weight reuse (CVPT):
  # lowered, not compiled, for CPU, CUDA and TPU with a symbolic batch.
  spec = export_fixtures.export_spec(method)
  registry.get_method(method)  # a known method
  factory.validate_spec(spec)
  stablehlo_export.check_exportable(spec, export_fixtures.HALF, 0, ("cpu", "cuda", "tpu"))
