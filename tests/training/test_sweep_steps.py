"""The vmapped step of a sweep: each setting's own learning rate and weight decay
are inputs of one program, and each setting steps like its separate run's step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_fixtures
import tolerances
from vpt_jax.methods import factory
from vpt_jax.params import freezing
from vpt_jax.training import optimizers
from vpt_jax.training import steps
from vpt_jax.training import sweep_steps

pytestmark = pytest.mark.numerics  # run again under SSE4.2 in CI


def test_per_setting_learning_rate_and_decay_are_inputs_of_one_program():
  """Two SGD settings, first step by hand: update = -lr * (g + wd * theta), the
  head bias undecayed, frozen leaves untouched; lr = base_lr * batch / 256."""
  params = {"head": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
            "vpt": {"deep": jnp.full((3, 2), 2.0)},
            "embedding": {"kernel": jnp.full((4,), 2.0)}}
  labels = freezing.label_params(params, (("vpt/.*", "train"), ("head/.*", "train"),
                                           (".*", "frozen")))
  settings = [checkpoint_fixtures.sprites_run_config(**{
                  "optim.base_lr": lr, "optim.weight_decay": wd, "optim.batch_size": 128,
                  "optim.warmup_epochs": 0.0})
              for lr, wd in ((0.2, 0.5), (0.6, 0.0))]
  make_tx = sweep_steps.make_setting_optimizer(settings[0], labels, steps_per_epoch=1.0,
                                               decay=True)
  grads = jax.tree.map(jnp.ones_like, params)

  def first_update(hparams):
    tx, schedule = make_tx(hparams["peak_lr"], hparams["weight_decay"])
    return tx.update(grads, tx.init(params), params)[0], schedule(0)
  updates, lrs = jax.jit(jax.vmap(first_update))(sweep_steps.setting_hparams(settings))
  np.testing.assert_allclose(lrs, [0.1, 0.3], rtol=1e-6)
  np.testing.assert_allclose(updates["vpt"]["deep"][:, 0, 0], [-0.1 * 2.0, -0.3 * 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"][:, 0, 0], [-0.2, -0.3], rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"][:, 0], [-0.1, -0.3], rtol=1e-6)
  np.testing.assert_array_equal(updates["embedding"]["kernel"], 0.0)


def test_head_only_settings_on_cached_features_keep_their_own_batchnorm_averages():
  """MLP-2 (dropout and BatchNorm in the head) on cached features: each fused
  setting steps like the trainer's own step with its own constant optimizer."""
  config = checkpoint_fixtures.sprites_run_config(**{
      "method": "mlp-2", "model.variant": "test/4", "model.image_size": 16,
      "optim.warmup_epochs": 0.0})
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
  settings = [checkpoint_fixtures.override(config.copy_and_resolve_references(),
                                          {"optim.base_lr": lr, "optim.weight_decay": wd})
              for lr, wd in ((1.0, 1e-2), (4.0, 0.0))]

  def fresh_state(tx):
    return {"step": jnp.zeros([], jnp.int32), "params": variables["params"],
            "opt_state": tx.init(variables["params"]), "batch_stats": variables["batch_stats"]}
  expected = []
  for setting in settings:  # as setup.build_runs builds it: constants
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
  make_tx = sweep_steps.make_setting_optimizer(config, labels, steps_per_epoch=1.0, decay=True)
  hparams = sweep_steps.setting_hparams(settings)
  group_tx, _ = make_tx(hparams["peak_lr"][0], hparams["weight_decay"][0])
  state = jax.jit(lambda states: sweep_steps.stack_states(states, labels))(
      [fresh_state(group_tx)] * 2)
  step = jax.jit(sweep_steps.make_fused_train_step(model, labels, make_tx, **norm))
  for batch in batches:
    state, metrics = step(state, hparams, batch, jax.random.key(1))
  assert metrics["loss"].shape == (2,)
  unstack = jax.jit(
      lambda fused_state, index: sweep_steps.unstack_state(fused_state, labels, index))
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


def test_each_setting_gets_its_own_finite_flag():
  """Linear probe on cached features, settings lr 1e45 and 1.0: 1e45 * 128 / 256
  overflows float32, so the first setting's update is non-finite, the second's
  is not; the flag of the shared step is per setting."""
  config = checkpoint_fixtures.sprites_run_config(**{
      "method": "linear", "model.variant": "test/4", "model.image_size": 16,
      "optim.warmup_epochs": 0.0})
  model = factory.build_model(factory.model_spec(config), 3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  params = checkpoint_fixtures.randomize(shapes["params"], seed=0)
  labels = freezing.label_params(params, factory.trainable_rules(config))
  settings = [checkpoint_fixtures.override(config.copy_and_resolve_references(),
                                          {"optim.base_lr": lr}) for lr in (1e45, 1.0)]
  make_tx = sweep_steps.make_setting_optimizer(config, labels, steps_per_epoch=1.0,
                                               decay=True)
  hparams = sweep_steps.setting_hparams(settings)
  group_tx, _ = make_tx(hparams["peak_lr"][0], hparams["weight_decay"][0])
  fresh = {"step": jnp.zeros([], jnp.int32), "params": params,
           "opt_state": group_tx.init(params)}
  state = sweep_steps.stack_states([fresh] * 2, labels)
  rng = np.random.default_rng(0)
  batch = {"features": rng.normal(size=(8, 16)).astype(np.float32),
           "label": rng.integers(0, 3, 8).astype(np.int32)}
  step = jax.jit(sweep_steps.make_fused_train_step(
      model, labels, make_tx, mean=(0.5,) * 3, std=(0.25,) * 3))
  _, metrics = step(state, hparams, batch, jax.random.key(1))
  assert np.isfinite(metrics["loss"]).all()  # both from the same finite weights
  np.testing.assert_array_equal(metrics[steps.STATE_FINITE], [0, 1])
