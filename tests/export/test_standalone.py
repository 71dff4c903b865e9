"""The entry point into the standalone formats: settings refused before anything loads."""

import json

import jax
import pytest

import export_fixtures
from vpt_jax import errors
from vpt_jax.export import standalone

IMAGE = export_fixtures.IMAGE


def test_settings_are_refused_before_the_export_is_read(tmp_path):
  missing = str(tmp_path / "no_export")
  cases = [({"export_format": "npz"}, "format 'npz' needs vpt_jax to serve; a standalone "
            "export is one of stablehlo, saved_model"),
           ({"export_format": "onnx"}, "unknown export.format 'onnx'"),
           ({"export_format": "stablehlo", "batch_size": -2}, "export.batch_size=-2"),
           ({"export_format": "saved_model", "platforms": "cpu,metal"}, "export.platforms")]
  for settings, message in cases:
    with pytest.raises(errors.UserError, match=message):
      standalone.export_task(missing, str(tmp_path / "out"), **settings)
    with pytest.raises(errors.UserError, match=message):
      standalone.export_tasks({"a": missing}, str(tmp_path / "out"), **settings)
  with pytest.raises(errors.UserError, match="No task export at"):  # then the export
    standalone.export_task(missing, str(tmp_path / "out"), export_format="stablehlo")


def test_fixed_batch_size_and_platforms_reach_the_function(tmp_path, backbone):
  export = export_fixtures.write_export(tmp_path / "task", backbone, "vpt_shallow", 3, 1)
  directory = standalone.export_task(export, str(tmp_path / "hlo"), export_format="stablehlo",
                                     batch_size=2, platforms="tpu, cpu")
  with open(f"{directory}/model.stablehlo", "rb") as f:
    exported = jax.export.deserialize(f.read())
  assert exported.in_avals[0].shape == (2, IMAGE, IMAGE, 3)
  assert exported.platforms == ("tpu", "cpu")
  assert exported.out_avals[0].shape == (2, 3)


def test_run_py_export_of_many_tasks_writes_one_stacked_model(tmp_path, capsys):
  from vpt_jax import cli  # pylint: disable=g-import-not-at-top
  _, backbone, exports = export_fixtures.write_workspace(tmp_path)
  output = str(tmp_path / "served")
  tasks = ",".join(f"{name}={exports[name]}" for name in ("c", "a"))
  assert cli.export_tasks(tasks, output, backbone, "stablehlo", 0, "cpu") == output
  assert capsys.readouterr().out.strip() == output
  with open(f"{output}/model.json") as f:
    sidecar = json.load(f)
  assert [t["name"] for t in sidecar["tasks"]] == ["c", "a"]  # task index order: --tasks'
  with open(f"{output}/model.stablehlo", "rb") as f:
    exported = jax.export.deserialize(f.read())
  assert [str(a.shape) for a in exported.in_avals] == ["(b, 16, 16, 3)", "(b,)"]
