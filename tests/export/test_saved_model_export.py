"""TensorFlow SavedModels: loaded with tf.saved_model.load where vpt_jax cannot be imported."""

import numpy as np
import pytest

import export_fixtures
from vpt_jax import errors
from vpt_jax.export import saved_model_export
from vpt_jax.export import stablehlo_export

IMAGE = export_fixtures.IMAGE
workspace = export_fixtures.two_structure_workspace
STACKED_IMAGES = export_fixtures.random_images(6, seed=8)
TASK_INDEX = np.asarray([1, 3, 0, 5, 2, 3], np.int32)  # 5 names no task


@pytest.fixture(scope="module")
def saved(workspace):
  """Task a alone (any batch size) and the four tasks stacked (batch size 6), as
  SavedModels, both called in one subprocess without vpt_jax."""
  root, backbone, exports = workspace
  single, stacked = root / "a_saved", root / "stacked_saved"
  saved_model_export.write_saved_model(
      stablehlo_export.single_task_model(exports["a"], backbone), str(single),
      platforms=("cpu",))
  saved_model_export.write_saved_model(
      stablehlo_export.stacked_tasks_model(exports, backbone), str(stacked), batch_size=6,
      platforms=("cpu", "cuda"))
  images = export_fixtures.random_images(3, seed=9)
  results = export_fixtures.call_without_vpt_jax(
      [single, stacked],
      [{"images": images}, {"images": STACKED_IMAGES, "task_index": TASK_INDEX}], root)
  return images, dict(zip(("single", "stacked"), results))


@pytest.mark.numerics
def test_single_task_saved_model_matches(workspace, saved):
  _, backbone, exports = workspace
  images, served = saved
  sidecar, outputs = served["single"]
  assert sidecar["export_format"] == "saved_model" and sidecar["platforms"] == ["cpu"]
  assert "tf.saved_model.load(" in sidecar["load"] and len(sidecar["load"].splitlines()) == 3
  assert sidecar["signature"]["inputs"][0]["shape"] == ["b", IMAGE, IMAGE, 3]
  expected = export_fixtures.single_task_logits(exports["a"], backbone, images)
  export_fixtures.check_standalone_outputs(outputs["all"], expected)
  export_fixtures.check_standalone_outputs(outputs["one"], expected[:1])


@pytest.mark.numerics
def test_stacked_saved_model_matches_with_a_fixed_batch(workspace, saved):
  _, backbone, exports = workspace
  _, served = saved
  sidecar, outputs = served["stacked"]
  assert [i["shape"] for i in sidecar["signature"]["inputs"]] == [[6, IMAGE, IMAGE, 3], [6]]
  assert set(outputs) == {"all"}  # a fixed batch: not called with one example
  export_fixtures.check_stacked_outputs(outputs, exports, backbone, STACKED_IMAGES, TASK_INDEX)


def test_weights_are_saved_as_variables(saved, workspace):
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root, backbone, exports = workspace
  # Every weight a variable (beside the graph, which has no 2 GB limit then),
  # counted against the served model's weights.
  weights = stablehlo_export.stacked_tasks_model(exports, backbone).weights
  saved_variables = tf.train.list_variables(
      str(root / "stacked_saved" / "saved_model" / "variables" / "variables"))
  shapes = sorted(tuple(shape) for name, shape in saved_variables
                  if name.startswith("weights/") and name.endswith("VARIABLE_VALUE"))
  assert shapes == sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(weights))


def test_models_that_cannot_be_exported_are_refused_in_one_line_before_writing(tmp_path):
  for fn, batch_size, message in (
      (export_fixtures.host_callback_fn, 2, "the toy model cannot be serialised .* keep the "
       "npz export"),
      (export_fixtures.python_int_batch_fn, 0, "cannot be exported for any batch size .* set "
       "a fixed batch size")):
    with pytest.raises(errors.UserError, match=message) as raised:
      saved_model_export.write_saved_model(export_fixtures.toy_served(fn),
                                           str(tmp_path / "out"), batch_size=batch_size,
                                           platforms=("cpu",))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()
