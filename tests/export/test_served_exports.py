"""The exports a multi-task server refuses, each with a message naming the task."""

import pytest

import checkpoint_fixtures as fixtures
import export_fixtures
from vpt_jax.export import serving
from vpt_jax.export import task_export

_write_export = export_fixtures.write_export
IMAGE = export_fixtures.IMAGE
workspace = export_fixtures.workspace


def test_backbone_mismatch_is_refused_naming_the_task(workspace, tmp_path):
  _, backbone, exports = workspace
  other = fixtures.write_tiny_backbone(tmp_path / "other.npz", image_size=IMAGE, seed=4)
  stale = _write_export(tmp_path / "stale", other, "vpt_deep", 3, 30)
  with pytest.raises(task_export.ExportError, match=r"Backbone mismatch: task 'stale'"):
    serving.MultiTaskServer({"a": exports["a"], "stale": stale}, backbone)


@pytest.mark.parametrize("method", ["partial-1", "full"])
def test_exports_that_trained_backbone_weights_are_refused(workspace, tmp_path, method):
  _, backbone, exports = workspace
  tuned = _write_export(tmp_path / "tuned", backbone, method, 3, 40)
  with pytest.raises(task_export.ExportError,
                     match=rf"task 'tuned' .*{method}.* trained backbone weights"):
    serving.MultiTaskServer({"a": exports["a"], "tuned": tuned}, backbone)


def test_different_image_sizes_are_refused(workspace, tmp_path):
  _, backbone, exports = workspace
  small = _write_export(tmp_path / "small", backbone, "vpt_deep", 3, 50, image_size=8)
  with pytest.raises(task_export.ExportError, match="tasks differ in image_size"):
    serving.MultiTaskServer({"a": exports["a"], "small": small}, backbone)
