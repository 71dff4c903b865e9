"""Sweeps: lr x weight-decay settings trained in one compiled program end where
their separate runs end, and the protocol picks the same setting."""

import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoint_fixtures
import protocol_fixtures
import run_fixtures
import tolerances
from configs import vtab_protocol
from vpt_jax.export import task_export
from vpt_jax.protocol import run_plan
from vpt_jax.protocol import tuning
from vpt_jax.training import config_checks
from vpt_jax.training import predictions
from vpt_jax.training import sweeps

# Fused: 1e30 diverges at once, 2.0 trains; weight decays 0 and non-zero share
# one program (it has a decay term; a zero decay adds 0 * theta). One by one:
# only the settings that train (a diverged run scores nothing in the selection).
FUSED_LRS, SEPARATE_LRS = (1e30, 2.0), (2.0,)
GRID_WDS, TASK = protocol_fixtures.TINY_GRID_WDS, protocol_fixtures.TINY_TASK


@pytest.fixture(scope="module")
def protocol_runs(tmp_path_factory):
  """The tiny protocol one by one (the trainer's path) and fused (4 in one program)."""
  root = tmp_path_factory.mktemp("fused")
  backbone = checkpoint_fixtures.write_tiny_backbone(root / "ViT-test_4.npz", image_size=16)
  data_dir = str(root / "tfds")
  return {fuse: protocol_fixtures.run_tiny_protocol(backbone, data_dir, str(root / f"fuse{fuse}"),
                                                    fuse, lrs)
          for fuse, lrs in ((0, SEPARATE_LRS), (8, FUSED_LRS))}


def _train_losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [(r["step"], r["train/loss"]) for r in map(json.loads, f) if "train/loss" in r]


def _latest_checkpoint(run_dir):
  """(step, the saved tree as stored, without a target) of a run's newest checkpoint."""
  manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"))
  step = manager.latest_step()
  tree = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return step, tree


def _assert_exports_agree(record, expected, setting) -> dict:
  """Two runs' exports hold the same leaves and values up to the summation order
  of the step's widest sums, the weight gradients over batch x tokens
  (8 x (1 + 2 prompts + 16 patches)), taken 6 times; returns the first's."""
  _, params = task_export.read_export(record["results"]["export"])
  _, expected_params = task_export.read_export(expected["results"]["export"])
  assert sorted(params) == sorted(expected_params), setting
  atol = tolerances.rounding_atol(tolerances.largest_magnitude(expected_params),
                                  reduction_length=8 * 19, steps=6)
  for path, value in expected_params.items():
    np.testing.assert_allclose(params[path], value, rtol=0, atol=atol,
                               err_msg=f"{setting} {path}")
  return params


@pytest.mark.numerics
def test_fused_settings_end_with_the_parameters_of_their_separate_runs(protocol_runs):
  separate, together = protocol_runs[0]["records"], protocol_runs[8]["records"]
  for setting, (alone_dir, alone) in separate.items():
    run_dir, record = together[setting]
    assert record["fused_settings"] == 4 and "fused_settings" not in alone
    assert record["status"] == alone["status"] == "finished", setting
    # Not bit-exact: vmap makes the per-setting matmuls batched ones, whose
    # summation order XLA may choose differently.
    fused_params = _assert_exports_agree(record, alone, setting)
    assert "vpt/deep" in fused_params
    val, alone_val = record["results"]["val"], alone["results"]["val"]
    assert val["count"] == alone_val["count"]
    assert abs(val["top1"] - alone_val["top1"]) <= tolerances.one_example(val["count"])
    # The loss is a mean of per-example cross-entropies: the same bound on O(1) terms.
    np.testing.assert_allclose(val["loss"], alone_val["loss"], rtol=0,
                               atol=tolerances.rounding_atol(val["loss"], 8 * 19, steps=6))
    fused_losses, alone_losses = _train_losses(run_dir), _train_losses(alone_dir)
    assert [s for s, _ in fused_losses] == [s for s, _ in alone_losses] == [2, 4, 6]
    np.testing.assert_allclose(
        [l for _, l in fused_losses], [l for _, l in alone_losses], rtol=0,
        atol=tolerances.rounding_atol(max(l for _, l in alone_losses), 8 * 19, steps=6))
    # The checkpoint has a separate run's layout (for wd 0 without the decay
    # term the program has), so the ordinary trainer resumes it.
    (step, fused_tree), (alone_step, alone_tree) = (_latest_checkpoint(run_dir),
                                                    _latest_checkpoint(alone_dir))
    assert step == alone_step == 6
    assert jax.tree.structure(fused_tree) == jax.tree.structure(alone_tree)
    for a, b in zip(jax.tree.leaves(fused_tree), jax.tree.leaves(alone_tree)):
      # Parameters and optimizer state (momentum: a sum of the same gradients).
      atol = tolerances.rounding_atol(np.max(np.abs(b)), reduction_length=8 * 19, steps=6)
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)
  # The two settings really differ (no lane read the other's weight decay).
  a, b = (task_export.read_export(together[(2.0, wd)][1]["results"]["export"])[1]
          for wd in GRID_WDS)
  assert not np.allclose(a["vpt/deep"], b["vpt/deep"], rtol=1e-4)


@pytest.mark.numerics
def test_fused_settings_on_four_devices_with_a_split_state_end_where_one_device_ends(
    protocol_runs, tmp_path):
  """The fused grid again, on four devices with ``optim.shard_state``: the stacked
  optimizer state is split over them, and every setting ends as on one device."""
  one_device = protocol_runs[8]
  config = one_device["config"]
  result = run_fixtures.run_on_emulated_devices(
      "sweep_multidevice_check.py", config.model.init_checkpoint, config.data.data_dir,
      str(tmp_path / "four"), *map(str, FUSED_LRS))
  assert result["devices"] == 4
  assert result["split_leaves"] and all(count > 0 for count in result["split_leaves"])
  best = lambda summary: (summary["lr"], summary["weight_decay"])
  assert best(result["best"]) == best(one_device["summary"]["best"])
  for lr, wd, run_dir, record in result["records"]:
    alone_dir, alone = one_device["records"][(lr, wd)]
    assert record["status"] == alone["status"], (lr, wd)
    if record["status"] != "finished":  # the same step and message, in its own folder
      assert (record["results"]["error"].replace(run_dir, "RUN")
              == alone["results"]["error"].replace(alone_dir, "RUN"))
      continue
    # Four partial gradient sums instead of one (reduce-scattered).
    _assert_exports_agree(record, alone, (lr, wd))


# Divergence and overflow follow from magnitudes (lr 1e30, 8e39), not rounding,
# and a rerun compares a path with itself: no numerics mark (tests/conftest.py).
def test_a_diverging_setting_stops_alone_where_a_separate_run_would(protocol_runs):
  """lr 1e30: step 1 starts from the finite initial prompts, its update makes
  them ~1e30, so the loss of step 2 is the first non-finite one."""
  for wd in GRID_WDS:
    run_dir, record = protocol_runs[8]["records"][(1e30, wd)]
    assert record["status"] == "diverged"
    assert re.match(r"loss became (nan|-?inf) at step 2;", record["results"]["error"])
    assert _train_losses(run_dir) == []  # its first log window already held the bad step
    assert "export" not in os.listdir(run_dir)


@pytest.mark.numerics
def test_the_protocol_selects_the_same_setting_fused(protocol_runs):
  off, on = protocol_runs[0]["summary"], protocol_runs[8]["summary"]
  assert on["best"] == off["best"] and off["best"]["lr"] == 2.0
  assert [g["status"] for g in on["grid"]] == ["diverged", "diverged", "finished", "finished"]
  assert on["grid"][2:] == off["grid"]


def test_a_rerun_resumes_each_setting_from_its_own_checkpoint(protocol_runs):
  """The fused group again: the finished settings restore step 6 and train
  nothing, the diverged ones their last good checkpoint (step 1) and diverge
  again at step 2; two programs, one per restored step."""
  config, records = protocol_runs[8]["config"], protocol_runs[8]["records"]
  settings = [(lr, wd) for lr in FUSED_LRS for wd in GRID_WDS]
  outcomes = sweeps.train_and_evaluate_settings(
      [run_plan.run_config(config, run_plan.RunSpec(TASK, "tune", *s)) for s in settings],
      [records[s][0] for s in settings])
  for setting, outcome in zip(settings, outcomes):
    previous = records[setting][1]["results"]
    if setting[0] == 1e30:
      assert isinstance(outcome, FloatingPointError) and str(outcome) == previous["error"]
    else:
      assert outcome["step"] == 6 and outcome["val"] == previous["val"]


def test_a_setting_whose_weights_overflow_keeps_only_finite_checkpoints(
    backbone, data_dir, tmp_path):
  """Two settings in one program, a save every step, keep=2: lr 8e39 overflows
  its weights at step 4 under a finite loss (``OVERFLOWS_AT_STEP_4``) and stops
  alone, keeping steps 2 and 3; lr 2.0 (same decay) trains its 9 steps. A rerun
  resumes each from its own newest checkpoint: the first stops at step 4 again.
  Only the finished setting saves its test predictions (its own row of the
  fused per-example logits)."""
  overrides = {**run_fixtures.OVERFLOWS_AT_STEP_4, "checkpoint.every_steps": 1,
               "checkpoint.keep": 2, "eval.save_predictions": True}
  configs = [run_fixtures.tiny_config(backbone, data_dir, **overrides),
             run_fixtures.tiny_config(backbone, data_dir, **dict(overrides, **{
                 "optim.base_lr": 2.0}))]
  workdirs = [str(tmp_path / "overflows"), str(tmp_path / "trains")]
  for attempt in range(2):  # the run, then the same call again
    diverged, finished = sweeps.train_and_evaluate_settings(configs, workdirs)
    assert isinstance(diverged, FloatingPointError), attempt
    assert str(diverged).startswith("parameters or optimizer state became non-finite")
    assert run_fixtures.error_step(diverged) == 4
    assert "The last finite checkpoint (step 3) is kept" in str(diverged)
    assert run_fixtures.saved_steps(workdirs[0]) == [2, 3]
    assert all(run_fixtures.checkpoint_is_finite(workdirs[0], step) for step in (2, 3))
    assert finished["step"] == 9 and run_fixtures.saved_steps(workdirs[1]) == [8, 9]
  logits, labels = predictions.read(os.path.join(workdirs[1], "predictions_test.npz"))
  assert logits.shape == (10, 3) and labels.shape == (10,)  # 10 test images, 3 counts
  correct = int(np.sum(np.argmax(logits.astype(np.float32), -1) == labels))
  assert abs(correct - round(10 * finished["test"]["top1"])) <= 1  # float16 ties aside
  assert not os.path.exists(os.path.join(workdirs[0], "predictions_test.npz"))


# ----------------------------------------------------------------- no compute

def test_settings_that_differ_in_other_fields_are_refused(tmp_path):
  run_config = checkpoint_fixtures.sprites_run_config
  base = run_config(**{"optim.base_lr": 1.0})
  with pytest.raises(config_checks.ConfigError, match=r"differ too: seed: 42, 43"):
    sweeps.check_fusable([base, run_config(**{"optim.base_lr": 0.5, "seed": 43})])
  with pytest.raises(config_checks.ConfigError, match=r"optim.batch_size: 128, 64"):
    sweeps.check_fusable([base, run_config(**{"optim.batch_size": 64})])
  # Refused before anything is written.
  workdirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  with pytest.raises(config_checks.ConfigError, match="prompt.num_prompts"):
    sweeps.train_and_evaluate_settings([base, run_config(**{"prompt.num_prompts": 5})],
                                       workdirs)
  assert not os.listdir(tmp_path)
  # lr and weight decay may differ.
  sweeps.check_fusable([base, run_config(**{"optim.base_lr": 0.5,
                                             "optim.weight_decay": 0.0})])


def test_reference_adamw_groups_zero_and_nonzero_decay_apart():
  # The reference's AdamW trains plain SGD when weight_decay is 0.
  run_config = checkpoint_fixtures.sprites_run_config
  configs = [run_config(**{"method": "full", "optim.weight_decay": wd})
             for wd in (1e-2, 0.0, 1e-3, 0.0, 1e-4)]
  with pytest.raises(config_checks.ConfigError, match="weight_decay 0 and non-zero"):
    sweeps.check_fusable(configs[:2])
  assert sweeps.group_settings(configs, 2) == [[0, 2], [4], [1, 3]]
  sgd = [run_config(**{"optim.weight_decay": wd}) for wd in (1e-2, 0.0, 1e-3)]
  assert sweeps.group_settings(sgd, 2) == [[0, 1], [2]]


def test_the_protocol_trains_unfinished_grid_points_in_groups(tmp_path):
  config = vtab_protocol.get_config("tasks=dmlab+eurosat")
  config = checkpoint_fixtures.override(config, {
      "protocol.lrs": (1.0, 0.5), "protocol.weight_decays": (1e-3, 0.0),
      "protocol.seeds": (42,), "protocol.fuse_settings": 3})
  groups = []

  def fused_stub(configs, run_dirs):
    groups.append([(c.data.task, c.optim.base_lr, c.optim.weight_decay) for c in configs])
    assert all(os.path.isdir(d) for d in run_dirs)
    return [FloatingPointError("loss became nan at step 3") if c.optim.base_lr == 1.0
            and c.optim.weight_decay == 0.0 else {"val": {"top1": c.optim.base_lr / 10}}
            for c in configs]

  def final_stub(run_config, run_dir):
    assert run_config.optim.base_lr == 1.0 and run_config.optim.weight_decay == 1e-3
    return {"test": {"top1": 0.5}}
  summaries = tuning.run_protocol(config, str(tmp_path), final_stub, write_report=False,
                                  fused_fn=fused_stub)
  grid = [(1.0, 1e-3), (1.0, 0.0), (0.5, 1e-3), (0.5, 0.0)]
  assert groups == [[("vtab/dmlab", *g) for g in grid[:3]], [("vtab/dmlab", *grid[3])],
                    [("vtab/eurosat", *g) for g in grid[:3]], [("vtab/eurosat", *grid[3])]]
  assert [g["status"] for g in summaries[0]["grid"]] == [
      "finished", "diverged", "finished", "finished"]
  assert summaries[0]["best"]["lr"] == 1.0 and summaries[0]["complete"]
  # A rerun finds every grid run finished; the records match the unfused config.
  groups.clear()
  tuning.run_protocol(config, str(tmp_path), final_stub, write_report=False,
                      fused_fn=fused_stub)
  assert groups == []
  tuning.run_protocol(checkpoint_fixtures.override(config, {"protocol.fuse_settings": 0}),
                      str(tmp_path), final_stub, write_report=False)
