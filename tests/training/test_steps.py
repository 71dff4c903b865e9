"""The train step (what changes, what it costs, the same on 1 or 4 devices) and the
evaluation step with its summary on hand-made logits, labels and masks.

Padded evaluation rows (mask False) are zero images with label 0 in a real run,
which a model tends to call class 0: counting them would inflate the accuracy.
The expected sums are written out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run_fixtures
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
  result = run_fixtures.run_on_emulated_devices("multidevice_check.py", timeout=300)
  assert result["devices"] == [1, 4]
  # Four partial gradient sums instead of one: sums over batch x tokens
  # (8 x (1 + 3 + 16)), 4 steps.
  bound = lambda magnitude: tolerances.rounding_atol(magnitude, reduction_length=8 * 20, steps=4)
  np.testing.assert_allclose(result["losses"][0], result["losses"][1], rtol=0,
                             atol=bound(max(result["losses"][0])))
  assert result["max_param_diff"] <= bound(result["max_param"])
  # The optimizer state split over the four devices: the same step, its
  # gradient reduce-scattered instead of all-reduced (another summation order).
  np.testing.assert_allclose(result["split_losses"], result["losses"][1], rtol=0,
                             atol=bound(max(result["losses"][1])))
  assert result["split_max_param_diff"] <= bound(result["max_param"])
  # Each leaf is split four ways along its largest axis of a size divisible by
  # four, or kept whole when there is none (the head bias (5,), the step count).
  for shape, shard in result["split_shapes"]:
    divisible = [size for size in shape if size % 4 == 0]
    if not divisible:
      assert shard == shape
    else:
      axis = shape.index(max(divisible))
      assert shard == shape[:axis] + [shape[axis] // 4] + shape[axis + 1:]
  assert any(shard != shape for shape, shard in result["split_shapes"])
  assert result["split_restores"]  # a split state's checkpoint resumes replicated


# ---------------------------------------------------------------- evaluation step

class _LogitsAsFeatures:
  """A stand-in model whose cached "features" are already the logits."""

  @staticmethod
  def apply(variables, inputs, *, train, from_features=False):
    assert from_features and not train and variables == {}
    return inputs


# Six classes (so top-5 is not trivially everything). Rows 0-2 are real, rows
# 3-4 padding that predicts its label 0 perfectly.
LOGITS = np.array([
    [0.0, 3.0, 1.0, 0.0, 0.0, 0.0],   # label 1: top-1 right
    [2.0, 0.0, 1.0, 0.0, 0.0, 0.0],   # label 2: top-1 wrong, top-5 right
    [-1.0, 0.0, 0.0, 0.0, 0.0, 5.0],  # label 0: last of six, wrong at top-5 too
    [9.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # padding
    [9.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # padding
], np.float32)
LABELS = np.array([1, 2, 0, 0, 0], np.int32)
MASK = np.array([True, True, True, False, False])


def _cross_entropy(row, label):
  return np.log(np.sum(np.exp(row.astype(np.float64)))) - row[label]


def test_eval_step_counts_only_real_rows():
  eval_step = jax.jit(steps.make_eval_step(_LogitsAsFeatures(), mean=(0.0,) * 3,
                                           std=(1.0,) * 3))
  totals = jax.device_get(eval_step({}, {"features": LOGITS, "label": LABELS, "mask": MASK}))
  assert float(totals["count"]) == 3.0
  assert float(totals["correct_top1"]) == 1.0  # only row 0
  assert float(totals["correct_top5"]) == 2.0  # rows 0 and 1
  expected_loss = sum(_cross_entropy(LOGITS[i], LABELS[i]) for i in range(3))
  np.testing.assert_allclose(float(totals["loss_sum"]), expected_loss, rtol=1e-6)


def test_summary_divides_by_the_real_count():
  summary = steps.summarize_eval({"count": 3.0, "correct_top1": 1.0, "correct_top5": 2.0,
                                  "loss_sum": 6.0})
  assert summary == {"top1": 1 / 3, "top5": 2 / 3, "loss": 2.0, "count": 3}


def test_summary_of_nothing_is_zero_not_a_division_error():
  summary = steps.summarize_eval({"count": 0.0, "correct_top1": 0.0, "correct_top5": 0.0,
                                  "loss_sum": 0.0})
  assert summary == {"top1": 0.0, "top5": 0.0, "loss": 0.0, "count": 0}


def test_all_finite_reads_every_float_leaf_and_skips_integers():
  trainable = {"vpt/deep": jnp.ones((2, 3)), "head/bias": jnp.zeros((3,))}
  opt_state = {"count": jnp.asarray(7, jnp.int32), "trace": {"head/bias": jnp.ones((3,))}}
  assert int(steps.all_finite(trainable, opt_state)) == 1
  one_nan = {"count": opt_state["count"], "trace": {"head/bias": jnp.asarray([1.0, jnp.nan, 1.0])}}
  assert int(steps.all_finite(trainable, one_nan)) == 0
  assert int(steps.all_finite(dict(trainable, **{"vpt/deep": jnp.full((2, 3), -jnp.inf)}),
                              opt_state)) == 0
  assert int(steps.all_finite({}, {"count": opt_state["count"]})) == 1  # nothing to check


def test_all_finite_reads_each_leaf_once_without_a_bool_array():
  """The check is one fused pass over each leaf: the compiled program holds no
  leaf-sized bool array (``all(isfinite(leaf))`` wrote one on CPU and reduced
  it in a second pass)."""
  leaves = {"kernel": jnp.ones((512, 384)), "bias": jnp.ones((384,), jnp.bfloat16)}
  compiled = jax.jit(steps.all_finite).lower(leaves).compile().as_text()
  assert "pred[512,384]" not in compiled and "pred[384]" not in compiled
  for name, bad in (("kernel", jnp.inf), ("kernel", -jnp.inf), ("bias", jnp.nan)):
    poisoned = dict(leaves, **{name: leaves[name].at[3].set(bad)})
    assert int(jax.jit(steps.all_finite)(poisoned)) == 0
  assert int(jax.jit(steps.all_finite)(leaves)) == 1


def test_train_step_flags_a_nan_in_one_optimizer_state_leaf():
  """Linear probe, SGD with momentum: the optimizer state holds the head's two
  momentum traces (float) and a step count (int). One NaN in a trace: the
  step's loss (from the finite weights) stays finite, the flag drops to 0."""
  _, labels, state, batch, step_fn = _setup(_spec("linear"))
  step_fn = jax.jit(step_fn)
  _, metrics = step_fn(state, batch, jax.random.key(1))
  assert int(metrics[steps.STATE_FINITE]) == 1
  leaves, treedef = jax.tree.flatten(state["opt_state"])
  float_leaves = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert len(float_leaves) == 2  # the traces of head/bias and head/kernel
  index = float_leaves[0]
  leaves[index] = leaves[index].at[(0,) * leaves[index].ndim].set(jnp.nan)
  poisoned = dict(state, opt_state=jax.tree.unflatten(treedef, leaves))
  _, metrics = step_fn(poisoned, batch, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"])) and int(metrics[steps.STATE_FINITE]) == 0
