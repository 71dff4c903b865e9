"""Memory options of the train step: block rematerialisation and gradient accumulation.

Both trade time for memory without changing what is computed: remat gives the
same loss and gradients, accumulation over k micro-batches the same update as
the whole batch at once; each must actually lower the compiled step's
temporary memory.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from configs import common
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.training import optimizers
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import steps

MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
NUM_CLASSES = 5


def _spec(method, **overrides):
  spec = dict(method=method, variant="test/4", image_size=16, dropout_rate=0.1,
              skip_dead_work=True, dtype="float32", num_prompts=0, prompt_dropout=0.0,
              prompt_projection=-1, pool="original", remat="none")
  method_spec = registry.get_method(method)
  if method_spec.uses_prompts:
    spec.update(num_prompts=3, prompt_dropout=0.1)
  if method_spec.settings == "cvpt":
    spec["cvpt"] = dict(num_prompts=3, insert=3, dropout=0.1, drop_path=0.5)
  if method_spec.settings == "e2vpt":
    spec["e2vpt"] = dict(num_prompts=2, dropout=0.1)
  spec.update(overrides)
  return spec


def _images(batch, size, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          "label": rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32)}


def _loss_and_grads(spec, params, batch):
  """Training-mode loss (dropout, drop path on) and its gradient for every parameter."""
  model = factory.build_model(spec, NUM_CLASSES)
  images = normalization_lib.normalize_images(batch["image"], **MEAN_STD)
  logits_fn = lambda p: model.apply({"params": p}, images, train=True,
                                    rngs={"dropout": jax.random.key(3)})
  return jax.value_and_grad(
      lambda p: steps.cross_entropy(logits_fn(p), batch["label"]).mean())(params)


def _random_params(shapes, seed=0):
  """Parameters of the given shapes drawn N(0, 0.2^2) (no init compile needed)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


# The block-level paths remat must carry: VPT-deep's key/value-only prompts and
# CLS-only last block; E2VPT's key-value prompts, with a pool that reads the
# prompt outputs (so the last block takes the prompts into the sequence);
# CVPT's cross-attention and drop path, an rng used inside the block (as the
# backbone dropout of full fine-tuning is), which the recomputation must redraw
# identically.
@pytest.mark.parametrize("method, overrides", [
    ("vpt_deep", {}),
    ("e2vpt", {"pool": "imgprompt_pool"}),
    ("cvpt", {}),
])
@pytest.mark.numerics
def test_remat_gives_the_same_loss_and_gradients(method, overrides):
  plain = _spec(method, **overrides)
  rematted = dict(plain, remat="block")
  shapes = factory.variable_shapes(factory.build_model(plain, NUM_CLASSES), 16)["params"]
  # The same parameter tree, so checkpoints and exports are interchangeable.
  remat_shapes = factory.variable_shapes(factory.build_model(rematted, NUM_CLASSES), 16)
  assert jax.tree.structure(remat_shapes["params"]) == jax.tree.structure(shapes)
  params = _random_params(shapes)
  batch = _images(4, 16)
  (loss, grads), (remat_loss, remat_grads), eval_loss = jax.jit(
      lambda p: (_loss_and_grads(plain, p, batch), _loss_and_grads(rematted, p, batch),
                 _eval_loss(plain, p, batch)))(params)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  flat_remat = trees.flatten(remat_grads)
  for path, grad in trees.flatten(grads).items():
    # Recomputation may fuse differently: float-rounding differences only, in
    # sums over batch x tokens (4 x (1 + 3 + 16)) chained back through 4 blocks
    # (4 sums each).
    atol = tolerances.rounding_atol(np.max(np.abs(grad)), reduction_length=4 * 20, steps=4 * 4)
    np.testing.assert_allclose(flat_remat[path], grad, rtol=0, atol=atol, err_msg=path)
  # Dropout and drop path were on: the loss differs from the deterministic one.
  assert abs(float(loss) - float(eval_loss)) > 1e-4


def _eval_loss(spec, params, batch):
  """The loss without dropout or drop path."""
  model = factory.build_model(spec, NUM_CLASSES)
  logits = model.apply({"params": params},
                       normalization_lib.normalize_images(batch["image"], **MEAN_STD))
  return steps.cross_entropy(logits, batch["label"]).mean()


def _state_and_step(spec, batch_size, accumulation_steps=1, optimizer=None, lr=0.05):
  model = factory.build_model(spec, NUM_CLASSES)
  params = factory.init_variables(model, spec["image_size"], seed=0)["params"]
  method = registry.get_method(spec["method"])
  labels = freezing.label_params(params, method.trainable_rules)
  schedule = lambda step: lr
  tx = optimizers.make_optimizer(labels, name=optimizer or method.optimizer,
                                 learning_rate=schedule, weight_decay=1e-4)
  state = {"step": jnp.zeros([], jnp.int32), "params": params,
           "opt_state": jax.jit(tx.init)(params)}
  step_fn = steps.make_train_step(model, labels, tx, schedule, **MEAN_STD,
                                  accumulation_steps=accumulation_steps)
  return state, _images(batch_size, spec["image_size"]), jax.jit(step_fn)


def _temp_bytes(step_fn, state, batch) -> int:
  """The compiled step's temporary buffers (activations kept for the backward pass)."""
  compiled = step_fn.lower(state, batch, jax.random.key(1)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _abstract_step(spec, batch_size):
  """(state shapes, batch, jitted step) without computing any parameter."""
  model = factory.build_model(spec, NUM_CLASSES)
  params = factory.variable_shapes(model, spec["image_size"])["params"]
  labels = freezing.label_params(params, registry.get_method(spec["method"]).trainable_rules)
  tx = optimizers.make_optimizer(labels, name="sgd", learning_rate=lambda s: 0.1,
                                 weight_decay=1e-4)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params)}
  step_fn = steps.make_train_step(model, labels, tx, lambda s: 0.1, **MEAN_STD)
  return state, _images(batch_size, spec["image_size"]), jax.jit(step_fn)


# XLA:CPU's default scheduler favours concurrency and runs the recomputation as
# soon as its inputs exist, which keeps every block's activations alive anyway;
# its memory-minimising scheduler (what accelerator backends aim for under
# memory pressure) shows what remat saves.
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def remat_temp_bytes() -> dict:
  """{remat: compiled step temp bytes}: VPT-deep, 4 blocks at 32 px (64 patches), batch 8."""
  spec = _spec("vpt_deep", variant="test4/4", image_size=32, num_prompts=5)
  temp = {}
  for remat in ("none", "block"):
    state, batch, step_fn = _abstract_step(dict(spec, remat=remat), 8)
    temp[remat] = _temp_bytes(step_fn, state, batch)
  return temp


RESIDUAL_BYTES = {"f32": 4, "bf16": 2, "i32": 4, "u32": 4, "bool": 1}


def _saved_residual_bytes(spec, batch_size=8):
  """Bytes the prompts' gradient keeps from the forward pass (jax's own accounting)."""
  model = factory.build_model(spec, NUM_CLASSES)
  params = _random_params(factory.variable_shapes(model, spec["image_size"])["params"])
  batch = _images(batch_size, spec["image_size"])
  images = normalization_lib.normalize_images(batch["image"], **MEAN_STD)

  def loss(prompts):
    logits = model.apply({"params": dict(params, vpt=prompts)}, images)
    return steps.cross_entropy(logits, batch["label"]).mean()
  # jax's public view of the residuals is printed: "f32[8,65,16] output of add from ...".
  listing = io.StringIO()
  with contextlib.redirect_stdout(listing):
    ad_checkpoint.print_saved_residuals(loss, params["vpt"])
  total = 0
  for line in listing.getvalue().splitlines():
    dtype, dims, origin = re.fullmatch(r"(\w+)\[([\d,]*)\] (.*)", line).groups()
    # Parameters and constants are in memory anyway; count the activations.
    if "from the argument" in origin or "constant" in origin or "literal" in origin:
      continue
    total += int(np.prod([int(d) for d in dims.split(",") if d])) * RESIDUAL_BYTES[dtype]
  return total


def test_remat_keeps_fewer_activations_and_lowers_the_step_temp_memory():
  spec = _spec("vpt_deep", variant="test4/4", image_size=32, num_prompts=5)
  kept = {remat: _saved_residual_bytes(dict(spec, remat=remat)) for remat in ("none", "block")}
  # Only each block's input remains (plus the last block's CLS-row work).
  assert kept["block"] < 0.2 * kept["none"], kept
  code = "import json, conftest, test_remat_accumulation as t; print(json.dumps(t.remat_temp_bytes()))"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " " + MEMORY_SCHEDULER_FLAG)
  # conftest (the tests folder) sets up JAX; this file's folder holds the module.
  here = os.path.dirname(os.path.abspath(__file__))
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), here])
  out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(here), env=env,
                       capture_output=True, text=True, timeout=300, check=True)
  temp = json.loads(out.stdout.strip().splitlines()[-1])
  assert temp["block"] < 0.7 * temp["none"], temp


@pytest.mark.numerics
def test_accumulation_equals_one_big_batch_step_and_uses_less_memory():
  # No dropout anywhere, so the two steps compute the same function of the batch.
  spec = _spec("vpt_deep", prompt_dropout=0.0, image_size=32)
  results = {}
  for k in (1, 4):
    state, batch, step_fn = _state_and_step(spec, 16, accumulation_steps=k, lr=0.5)
    temp = _temp_bytes(step_fn, state, batch)
    history = []
    for _ in range(3):  # momentum carries every step's gradient into the next
      state, metrics = step_fn(state, batch, jax.random.key(1))
      history.append(jax.device_get(metrics))
    results[k] = state, history, temp
  (one_state, one_history, one_temp), (acc_state, acc_history, acc_temp) = results[1], results[4]
  # Four partial sums instead of one: sums over batch x tokens (16 x (1 + 3 +
  # 64)) for 3 steps.
  bound = lambda magnitude: tolerances.rounding_atol(magnitude, reduction_length=16 * 68,
                                                     steps=3)
  for one, acc in zip(one_history, acc_history):
    for name in ("loss", "accuracy", "grad_norm", "learning_rate"):
      np.testing.assert_allclose(acc[name], one[name], rtol=0, atol=bound(abs(one[name])),
                                 err_msg=name)
  assert one_history[-1]["loss"] < one_history[0]["loss"]  # the parameters moved
  flat_one = trees.flatten(jax.device_get(one_state["params"]))
  flat_acc = trees.flatten(jax.device_get(acc_state["params"]))
  atol = bound(tolerances.largest_magnitude(flat_one))
  for path, value in flat_one.items():
    np.testing.assert_allclose(flat_acc[path], value, rtol=0, atol=atol, err_msg=path)
  # The activations of 4 examples at a time instead of 16.
  assert acc_temp < 0.75 * one_temp, (acc_temp, one_temp)


class _MaskedScale(nn.Module):
  """logits = x * dropout(w): one mask per call, shared by every row of the batch."""
  width: int

  @nn.compact
  def __call__(self, x, *, train=False, from_features=False):
    del from_features
    w = self.param("w", nn.initializers.ones, (self.width,))
    mask_shared = nn.Dropout(0.5, broadcast_dims=(0,))
    return x * mask_shared(jnp.broadcast_to(w, x.shape), deterministic=not train)


@pytest.mark.parametrize("k", [1, 4])
def test_each_micro_batch_draws_its_own_dropout_mask(k):
  # w_j's gradient is zero exactly where the mask dropped it in every
  # micro-batch: a fraction 0.5^k of the entries with independent masks per
  # micro-batch, but 0.5 if the micro-batches shared one mask.
  width, batch = 4096, 8
  model = _MaskedScale(width)
  params = {"w": jnp.ones((width,))}
  labels = {"w": freezing.TRAIN}
  tx = optimizers.make_optimizer(labels, name="sgd", learning_rate=lambda s: 1.0,
                                 weight_decay=0.0, momentum=0.0)
  step_fn = jax.jit(steps.make_train_step(model, labels, tx, lambda s: 1.0, **MEAN_STD,
                                          accumulation_steps=k))
  rng = np.random.default_rng(0)
  data = {"features": rng.uniform(0.5, 1.5, (batch, width)).astype(np.float32),
          "label": rng.integers(0, width, (batch,)).astype(np.int32)}
  state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": tx.init(params)}
  new_state, _ = step_fn(state, data, jax.random.key(0))
  unchanged = float(np.mean(np.asarray(new_state["params"]["w"]) == 1.0))
  expected = 0.5 ** k
  # Binomial(4096, p) has a standard deviation below 0.008 in this fraction.
  assert abs(unchanged - expected) < 0.04, (unchanged, expected)


def test_accumulation_refuses_bad_settings_before_compute():
  spec = _spec("vpt_deep")
  model = factory.build_model(spec, NUM_CLASSES)
  params = factory.variable_shapes(model, 16)["params"]
  labels = freezing.label_params(params, registry.get_method("vpt_deep").trainable_rules)
  tx = optimizers.make_optimizer(labels, name="sgd", learning_rate=lambda s: 0.1,
                                 weight_decay=0.0)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params)}
  batch = _images(6, 16)
  make = lambda k: steps.make_train_step(model, labels, tx, lambda s: 0.1, **MEAN_STD,
                                         accumulation_steps=k)
  for bad in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match="accumulation_steps must be an integer"):
      make(bad)
  # Raised while tracing, before anything is compiled or run.
  with pytest.raises(ValueError, match="batch size 6 is not divisible by optim.accumulation"):
    jax.jit(make(4)).trace(state, batch, jax.random.key(0))
  # BatchNorm heads: micro-batch statistics are not the batch's.
  with pytest.raises(ValueError, match="BatchNorm"):
    jax.jit(make(2)).trace(dict(state, batch_stats={}), batch, jax.random.key(0))


def _config(**fields):
  config = common.base_config()
  config.model.variant = "test/4"
  config.model.image_size = 16
  config.data.builder = "vpt_sprites/tiny"
  config.model.from_scratch = True  # no backbone file: only the config is checked
  for key, value in fields.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def test_config_checks_and_spec_field():
  # Imported here: the config checks pull in TensorFlow, which the subprocess of
  # the remat memory test should not have to load.
  from vpt_jax.training import config_checks  # pylint: disable=g-import-not-at-top
  config_checks.validate_config(_config(**{"optim.accumulation_steps": 4, "optim.batch_size": 16}))
  with pytest.raises(ValueError, match="not divisible by optim.accumulation_steps=3"):
    config_checks.validate_config(
        _config(**{"optim.accumulation_steps": 3, "optim.batch_size": 16}))
  mlp = _config(**{"optim.accumulation_steps": 2, "optim.batch_size": 16})
  mlp.method = "mlp-3"
  with pytest.raises(ValueError, match="BatchNorm head"):
    config_checks.validate_config(mlp)
  with pytest.raises(ValueError, match="Unknown model.remat 'blocks'"):
    config_checks.validate_config(_config(**{"model.remat": "blocks"}))
  spec = factory.model_spec(_config(**{"model.remat": "block"}))
  assert spec["remat"] == "block"
  assert factory.build_model(spec, NUM_CLASSES).remat == "block"
  # A spec written before the field existed (e.g. an older export's task.json).
  old_spec = {k: v for k, v in spec.items() if k != "remat"}
  assert factory.build_model(old_spec, NUM_CLASSES).remat == "none"
