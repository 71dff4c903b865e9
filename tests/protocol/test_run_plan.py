"""The protocol's plan: the reference grids and seeds, the runs' configs per phase."""

import pytest

import protocol_fixtures
from vpt_jax.protocol import hparams
from vpt_jax.protocol import run_plan

protocol_config = protocol_fixtures.protocol_config


def test_reference_grids_and_seeds_per_method():
  runs = run_plan.plan(protocol_config("method=vpt_deep,tasks=dmlab+eurosat"))
  tune = [r for r in runs if r.phase == "tune"]
  assert len(tune) == 2 * 10 * 4 and len(runs) == 2 * (40 + 5)
  assert [(r.lr, r.weight_decay) for r in tune[:5]] == [
      (50.0, 0.01), (50.0, 0.001), (50.0, 0.0001), (50.0, 0.0), (25.0, 0.01)]
  assert [r.seed for r in runs[40:45]] == [42, 44, 82, 100, 800]
  full = run_plan.grid(protocol_config("method=full,tasks=dmlab"), "vtab/dmlab")
  assert full == ((0.005, 0.001, 0.0005, 0.0001), (0.01, 0.001, 0.0001, 0.0))
  cub = run_plan.grid(protocol_config("method=vpt_deep,tasks=fgvc/cub"), "fgvc/cub")
  assert 0.05 not in cub[0] and len(cub[0]) == 9  # tune_fgvc.py's prompt grid
  assert run_plan.parse_tasks("structured+fgvc/all")[-5:] == [
      "fgvc/cub", "fgvc/nabirds", "fgvc/oxford_flowers", "fgvc/stanford_dogs",
      "fgvc/stanford_cars"]


def test_run_configs_per_phase():
  config = protocol_config("method=vpt_deep,tasks=clevr_dist", **{"eval.save_predictions": True})
  tune = run_plan.run_config(config, run_plan.RunSpec("vtab/clevr_dist", "tune", 2.5, 1e-3, 42))
  assert (tune.data.task, tune.data.train_split, tune.data.eval_split, tune.data.test_split) == (
      "vtab/clevr_dist", "train800", "val200", "")
  assert (tune.optim.base_lr, tune.optim.weight_decay) == (2.5, 1e-3)
  assert tune.prompt.num_prompts == hparams.vpt_deep_prompts("clevr_dist") == 200
  assert "protocol" not in tune
  assert not tune.eval.save_predictions  # predictions of the final runs only
  final = run_plan.run_config(config, run_plan.RunSpec("vtab/clevr_dist", "final", 2.5, 0.0, 800))
  assert (final.data.train_split, final.data.eval_split, final.data.test_split, final.seed) == (
      "train800val200", "", "test", 800)
  assert final.eval.save_predictions
  cub = run_plan.run_config(protocol_config("tasks=fgvc/cub"),
                            run_plan.RunSpec("fgvc/cub", "final", 1.0, 0.0, 42))
  assert (cub.data.train_split, cub.data.test_split, cub.data.preprocess) == (
      "train", "test", "resize_crop_flip")
  with pytest.raises(run_plan.ProtocolError, match="tune_train_split"):
    run_plan.plan(protocol_config("tasks=tfds:mnist"))
    run_plan.splits(protocol_config("tasks=tfds:mnist"), "tfds:mnist")
