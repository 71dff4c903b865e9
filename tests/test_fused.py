"""Fused sweeps: lr x weight-decay settings trained in one compiled program end
where their separate runs end, and the protocol picks the same setting."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoint_fixtures
import tolerances
from configs import common
from configs import vtab_protocol
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.protocol import tuning
from vpt_jax.training import fused
from vpt_jax.training import optimizers
from vpt_jax.params import freezing
from vpt_jax.training import steps
from vpt_jax.training import trainer

pytestmark = pytest.mark.numerics  # run again under SSE4.2 in CI

# Fused: 1e30 diverges at once, 2.0 trains; weight decays 0 and non-zero share
# one program (it has a decay term; a zero decay adds 0 * theta). One by one:
# only the settings that train (a diverged run scores nothing in the selection).
FUSED_LRS, SEPARATE_LRS = (1e30, 2.0), (2.0,)
GRID_WDS = (1e-2, 0.0)
TASK = "tfds:vpt_sprites/tiny"


def _override(config, overrides):
  config.unlock()
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    node = config
    for name in filter(None, section.split(".")):
      node = node[name]
    node[field] = value
  config.lock()
  return config


def tiny_protocol(backbone, data_dir, **overrides):
  """A grid of VPT-deep (prompt dropout on) on 24 images, 6 steps, no final runs."""
  config = vtab_protocol.get_config(f"method=vpt_deep,tasks={TASK}")
  return _override(config, {
      "model.variant": "test/4", "model.image_size": 16, "model.init_checkpoint": backbone,
      "prompt.num_prompts": 2, "data.data_dir": data_dir, "data.label_key": "count",
      "optim.batch_size": 8, "optim.epochs": 2, "optim.warmup_epochs": 0,
      "eval.batch_size": 8, "log_every_steps": 2, "protocol.weight_decays": GRID_WDS,
      "protocol.seeds": (), "protocol.tune_train_split": "train",
      "protocol.tune_eval_split": "validation", "protocol.final_train_split": "train",
      "protocol.final_test_split": "test", **overrides})


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
  """The tiny protocol one by one (the trainer's path) and fused (4 in one program)."""
  root = tmp_path_factory.mktemp("fused")
  backbone = checkpoint_fixtures.write_tiny_backbone(root / "ViT-test_4.npz", image_size=16)
  data_dir = str(root / "tfds")
  out = {}
  for fuse, lrs in ((0, SEPARATE_LRS), (8, FUSED_LRS)):
    config = tiny_protocol(backbone, data_dir, **{"protocol.fuse_settings": fuse,
                                                  "protocol.lrs": lrs})
    workdir = str(root / f"fuse{fuse}")
    summary, = tuning.run_protocol(config, workdir, write_report=False)
    records = {}
    for lr in lrs:
      for wd in GRID_WDS:
        run_dir = os.path.join(workdir, tuning.RunSpec(TASK, "tune", lr, wd).folder("vpt_deep"))
        with open(os.path.join(run_dir, tuning.RUN_FILE)) as f:
          records[(lr, wd)] = (run_dir, json.load(f))
    out[fuse] = {"config": config, "summary": summary, "records": records}
  return out


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


def test_fused_settings_end_with_the_parameters_of_their_separate_runs(sweeps):
  separate, together = sweeps[0]["records"], sweeps[8]["records"]
  for setting, (alone_dir, alone) in separate.items():
    run_dir, record = together[setting]
    assert record["fused_settings"] == 4 and "fused_settings" not in alone
    assert record["status"] == alone["status"] == "finished", setting
    _, fused_params = task_export.read_export(record["results"]["export"])
    _, alone_params = task_export.read_export(alone["results"]["export"])
    assert sorted(fused_params) == sorted(alone_params) and "vpt/deep" in fused_params
    # Not bit-exact: vmap makes the per-setting matmuls batched ones, whose
    # summation order XLA may choose differently. The widest sums of the step
    # are the weight gradients over batch x tokens (8 x (1 + 2 prompts + 16
    # patches)), taken 6 times.
    atol = tolerances.rounding_atol(tolerances.largest_magnitude(alone_params),
                                    reduction_length=8 * 19, steps=6)
    for path, value in alone_params.items():
      np.testing.assert_allclose(fused_params[path], value, rtol=0, atol=atol,
                                 err_msg=f"{setting} {path}")
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


def test_a_diverging_setting_stops_alone_where_a_separate_run_would(sweeps):
  """lr 1e30: step 1 starts from the finite initial prompts, its update makes
  them ~1e30, so the loss of step 2 is the first non-finite one."""
  for wd in GRID_WDS:
    run_dir, record = sweeps[8]["records"][(1e30, wd)]
    assert record["status"] == "diverged"
    assert re.match(r"loss became (nan|-?inf) at step 2;", record["results"]["error"])
    assert _train_losses(run_dir) == []  # its first log window already held the bad step
    assert "export" not in os.listdir(run_dir)


def test_the_protocol_selects_the_same_setting_fused(sweeps):
  off, on = sweeps[0]["summary"], sweeps[8]["summary"]
  assert on["best"] == off["best"] and off["best"]["lr"] == 2.0
  assert [g["status"] for g in on["grid"]] == ["diverged", "diverged", "finished", "finished"]
  assert on["grid"][2:] == off["grid"]


def test_a_rerun_resumes_each_setting_from_its_own_checkpoint(sweeps):
  """The fused group again: the finished settings restore step 6 and train
  nothing, the diverged ones their last good checkpoint (step 1) and diverge
  again at step 2; two programs, one per restored step."""
  config, records = sweeps[8]["config"], sweeps[8]["records"]
  settings = [(lr, wd) for lr in FUSED_LRS for wd in GRID_WDS]
  outcomes = fused.train_and_evaluate_settings(
      [tuning.run_config(config, tuning.RunSpec(TASK, "tune", *s)) for s in settings],
      [records[s][0] for s in settings])
  for setting, outcome in zip(settings, outcomes):
    previous = records[setting][1]["results"]
    if setting[0] == 1e30:
      assert isinstance(outcome, FloatingPointError) and str(outcome) == previous["error"]
    else:
      assert outcome["step"] == 6 and outcome["val"] == previous["val"]


# ----------------------------------------------------------------- no compute

def _run_config(**overrides):
  config = common.base_config()
  config.data.builder = "vpt_sprites/tiny"
  config.lock()
  return _override(config, overrides)


def test_settings_that_differ_in_other_fields_are_refused(tmp_path):
  base = _run_config(**{"optim.base_lr": 1.0})
  with pytest.raises(trainer.ConfigError, match=r"differ too: seed: 42, 43"):
    fused.check_fusable([base, _run_config(**{"optim.base_lr": 0.5, "seed": 43})])
  with pytest.raises(trainer.ConfigError, match=r"optim.batch_size: 128, 64"):
    fused.check_fusable([base, _run_config(**{"optim.batch_size": 64})])
  # Refused before anything is written.
  workdirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  with pytest.raises(trainer.ConfigError, match="prompt.num_prompts"):
    fused.train_and_evaluate_settings([base, _run_config(**{"prompt.num_prompts": 5})],
                                      workdirs)
  assert not os.listdir(tmp_path)
  # lr and weight decay may differ.
  fused.check_fusable([base, _run_config(**{"optim.base_lr": 0.5,
                                             "optim.weight_decay": 0.0})])


def test_reference_adamw_groups_zero_and_nonzero_decay_apart():
  # The reference's AdamW trains plain SGD when weight_decay is 0.
  configs = [_run_config(**{"method": "full", "optim.weight_decay": wd})
             for wd in (1e-2, 0.0, 1e-3, 0.0, 1e-4)]
  with pytest.raises(trainer.ConfigError, match="weight_decay 0 and non-zero"):
    fused.check_fusable(configs[:2])
  assert fused.group_settings(configs, 2) == [[0, 2], [4], [1, 3]]
  sgd = [_run_config(**{"optim.weight_decay": wd}) for wd in (1e-2, 0.0, 1e-3)]
  assert fused.group_settings(sgd, 2) == [[0, 1], [2]]


def test_per_setting_learning_rate_and_decay_are_inputs_of_one_program():
  """Two SGD settings, first step by hand: update = -lr * (g + wd * theta), the
  head bias undecayed, frozen leaves untouched; lr = base_lr * batch / 256."""
  params = {"head": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
            "vpt": {"deep": jnp.full((3, 2), 2.0)},
            "embedding": {"kernel": jnp.full((4,), 2.0)}}
  labels = freezing.label_params(params, (("vpt/.*", "train"), ("head/.*", "train"),
                                           (".*", "frozen")))
  settings = [_run_config(**{"optim.base_lr": lr, "optim.weight_decay": wd,
                             "optim.batch_size": 128, "optim.warmup_epochs": 0.0})
              for lr, wd in ((0.2, 0.5), (0.6, 0.0))]
  make_tx = fused.make_setting_optimizer(settings[0], labels, steps_per_epoch=1.0, decay=True)
  grads = jax.tree.map(jnp.ones_like, params)

  def first_update(hparams):
    tx, schedule = make_tx(hparams["peak_lr"], hparams["weight_decay"])
    return tx.update(grads, tx.init(params), params)[0], schedule(0)
  updates, lrs = jax.jit(jax.vmap(first_update))(fused.setting_hparams(settings))
  np.testing.assert_allclose(lrs, [0.1, 0.3], rtol=1e-6)
  np.testing.assert_allclose(updates["vpt"]["deep"][:, 0, 0], [-0.1 * 2.0, -0.3 * 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"][:, 0, 0], [-0.2, -0.3], rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"][:, 0], [-0.1, -0.3], rtol=1e-6)
  np.testing.assert_array_equal(updates["embedding"]["kernel"], 0.0)


def test_head_only_settings_on_cached_features_keep_their_own_batchnorm_averages():
  """MLP-2 (dropout and BatchNorm in the head) on cached features: each fused
  setting steps like the trainer's own step with its own constant optimizer."""
  config = _run_config(**{"method": "mlp-2", "model.variant": "test/4",
                          "model.image_size": 16, "optim.warmup_epochs": 0.0})
  model = factory.build_model(factory.model_spec(config), 3)
  # Random values without compiling an init: running variances kept positive.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  variables = {"params": checkpoint_fixtures.randomize(shapes["params"], seed=0),
               "batch_stats": jax.tree.map(np.abs, checkpoint_fixtures.randomize(
                   shapes["batch_stats"], seed=1))}
  labels = freezing.label_params(variables["params"], factory.trainable_rules(config))
  rng = np.random.default_rng(0)
  batches = [{"features": rng.normal(size=(8, 16)).astype(np.float32),
              "label": rng.integers(0, 3, 8).astype(np.int32)} for _ in range(3)]
  norm = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
  settings = [_override(config.copy_and_resolve_references(),
                        {"optim.base_lr": lr, "optim.weight_decay": wd})
              for lr, wd in ((1.0, 1e-2), (4.0, 0.0))]

  def fresh_state(tx):
    return {"step": jnp.zeros([], jnp.int32), "params": variables["params"],
            "opt_state": tx.init(variables["params"]), "batch_stats": variables["batch_stats"]}
  expected = []
  for setting in settings:  # as trainer.setup builds it: constants
    schedule = optimizers.make_schedule(
        optimizers.scaled_learning_rate(setting.optim.base_lr, setting.optim.batch_size),
        warmup_epochs=0.0, total_epochs=setting.optim.epochs, steps_per_epoch=1.0)
    tx = optimizers.make_optimizer(labels, name="sgd", learning_rate=schedule,
                                   weight_decay=setting.optim.weight_decay)
    step = jax.jit(steps.make_train_step(model, labels, tx, schedule, **norm))
    state = fresh_state(tx)
    for batch in batches:
      state, _ = step(state, batch, jax.random.key(1))
    expected.append(state)
  make_tx = fused.make_setting_optimizer(config, labels, steps_per_epoch=1.0, decay=True)
  hparams = fused.setting_hparams(settings)
  group_tx, _ = make_tx(hparams["peak_lr"][0], hparams["weight_decay"][0])
  state = jax.jit(lambda states: fused.stack_states(states, labels))([fresh_state(group_tx)] * 2)
  step = jax.jit(fused.make_fused_train_step(model, labels, make_tx, **norm))
  for batch in batches:
    state, metrics = step(state, hparams, batch, jax.random.key(1))
  assert metrics["loss"].shape == (2,)
  unstack = jax.jit(lambda fused_state, index: fused.unstack_state(fused_state, labels, index))
  initial = freezing.split(variables["params"], labels)[0]
  for index, alone in enumerate(expected):
    own = unstack(state, index)
    trained = freezing.split(own["params"], labels)[0]
    assert trained and all(p.startswith("head/") for p in trained)
    alone_trained = freezing.split(alone["params"], labels)[0]
    # vmap batches the settings' matmuls, so sums run in another order: every
    # gradient entry sums 8 examples of 16-wide products, over 3 steps.
    atol = tolerances.rounding_atol(tolerances.largest_change(initial, alone_trained),
                                    reduction_length=8 * 16, steps=len(batches))
    for path, value in alone_trained.items():
      np.testing.assert_allclose(trained[path], value, rtol=0, atol=atol, err_msg=path)
    for a, b in zip(jax.tree.leaves(own["batch_stats"]), jax.tree.leaves(alone["batch_stats"])):
      # Running averages of batch statistics: 8-example means of 16-wide sums.
      atol = tolerances.rounding_atol(np.max(np.abs(b)), reduction_length=8 * 16,
                                      steps=len(batches))
      np.testing.assert_allclose(a, b, rtol=0, atol=atol)
  assert not np.allclose(*(jax.tree.leaves(e["batch_stats"])[0] for e in expected))


def test_the_protocol_trains_unfinished_grid_points_in_groups(tmp_path):
  config = vtab_protocol.get_config("tasks=dmlab+eurosat")
  config = _override(config, {"protocol.lrs": (1.0, 0.5), "protocol.weight_decays": (1e-3, 0.0),
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
  tuning.run_protocol(_override(config, {"protocol.fuse_settings": 0}), str(tmp_path),
                      final_stub, write_report=False)
