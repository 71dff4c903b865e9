"""One real training step: what changes, what it costs, and that it is the same on 1 or 4 devices."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.training import optimizers
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import steps

MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _spec(method, **overrides):
  spec = dict(method=method, variant="test/4", image_size=16, dropout_rate=0.1,
              skip_dead_work=True, dtype="float32", num_prompts=0, prompt_dropout=0.0,
              prompt_projection=-1, pool="original")
  if registry.get_method(method).uses_prompts:
    spec.update(num_prompts=3, prompt_dropout=0.1)
  spec.update(overrides)
  return spec


def _setup(spec, rules=None, batch=8, num_classes=5):
  model = factory.build_model(spec, num_classes)
  size = spec["image_size"]
  params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
  labels = freezing.label_params(params, rules or registry.get_method(spec["method"]).trainable_rules)
  schedule = lambda step: 0.05
  tx = optimizers.make_optimizer(labels, name=registry.get_method(spec["method"]).optimizer,
                                 learning_rate=schedule, weight_decay=1e-4)
  state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": tx.init(params)}
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
           "label": rng.integers(0, num_classes, (batch,)).astype(np.int32)}
  step_fn = steps.make_train_step(model, labels, tx, schedule, **MEAN_STD)
  return model, labels, state, batch, step_fn


@pytest.mark.parametrize("method, trained_prefixes", [
    ("vpt_deep", ("vpt/", "head/")),
    ("vpt_shallow", ("vpt/", "head/")),
    ("linear", ("head/",)),
])
def test_only_trainable_parameters_change(method, trained_prefixes):
  _, _, state, batch, step_fn = _setup(_spec(method))
  before = trees.flatten(jax.device_get(state["params"]))
  new_state, metrics = jax.jit(step_fn)(state, batch, jax.random.key(1))
  after = trees.flatten(jax.device_get(new_state["params"]))
  assert np.isfinite(metrics["loss"])
  for path, value in before.items():
    if path.startswith(trained_prefixes):
      assert not np.array_equal(value, after[path]), f"{path} did not train"
    else:
      np.testing.assert_array_equal(value, after[path], err_msg=f"{path} changed")
  assert int(new_state["step"]) == 1


def test_full_fine_tuning_updates_the_backbone():
  _, _, state, batch, step_fn = _setup(_spec("full"))
  before = trees.flatten(jax.device_get(state["params"]))
  new_state, _ = jax.jit(step_fn)(state, batch, jax.random.key(1))
  after = trees.flatten(jax.device_get(new_state["params"]))
  changed = [p for p in before if not np.array_equal(before[p], after[p])]
  assert len(changed) == len(before)


def _step_flops(spec, rules=None, batch=8):
  _, _, state, batch, step_fn = _setup(spec, rules, batch=batch)
  compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(state, batch, jax.random.key(1)).compile()
  return compiled.cost_analysis()["flops"]


def test_frozen_backbone_costs_no_gradient_flops():
  # Same model and sequence length (prompts in the sequence, plain formulation);
  # only the trainable set differs.
  spec = _spec("vpt_deep", variant="micro/8", image_size=16, skip_dead_work=False)
  vpt = _step_flops(spec)
  full = _step_flops(spec, rules=((".*", "train"),))
  assert vpt < 0.75 * full, (vpt, full)
  # Skipping the dead prompt outputs is cheaper still.
  assert _step_flops(dict(spec, skip_dead_work=True)) < 0.9 * vpt


@pytest.mark.numerics
def test_step_is_identical_on_one_and_four_devices():
  script = os.path.join(os.path.dirname(__file__), "multidevice_check.py")
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == [1, 4]
  # Four partial gradient sums instead of one: sums over batch x tokens
  # (8 x (1 + 3 + 16)), 4 steps.
  bound = lambda magnitude: tolerances.rounding_atol(magnitude, reduction_length=8 * 20, steps=4)
  np.testing.assert_allclose(result["losses"][0], result["losses"][1], rtol=0,
                             atol=bound(max(result["losses"][0])))
  assert result["max_param_diff"] <= bound(result["max_param"])
