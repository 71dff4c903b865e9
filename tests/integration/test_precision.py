"""Mixed precision (model.dtype="bfloat16"): a bfloat16 backbone, float32 everything else.

What bfloat16 must mean: the backbone's matmuls and convolutions run in
bfloat16, while the parameters, the head, its logits, the loss, the gradients
and the optimizer state stay float32, and training follows the float32
trajectory closely.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.training import optimizers
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import steps

MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
# A class count that is no other dimension of the tiny model (width 16, MLP 32,
# 2 heads of 8, 17 tokens + 3 prompts, batch 8), so it marks the head's matmuls.
NUM_CLASSES = 7
BATCH = 8
# bfloat16 keeps 8 significant bits (relative rounding up to 2^-8 ~ 0.4%);
# through 2 blocks and 5 steps the loss drifts by about one such unit (~0.5%
# measured), well below 2%.
LOSS_RTOL = 2e-2


def _spec(dtype):
  return dict(method="vpt_deep", variant="test/4", image_size=16, dropout_rate=0.1,
              skip_dead_work=True, dtype=dtype, num_prompts=3, prompt_dropout=0.1,
              prompt_projection=-1, pool="original")


@functools.lru_cache(maxsize=None)
def _run(dtype, num_steps=5):
  """Trains the tiny VPT-deep model a few steps; every test reads this one run per dtype.

  Returns (model, initial state, batch, jitted step, final state, per-step metrics).
  """
  spec = _spec(dtype)
  model = factory.build_model(spec, NUM_CLASSES)
  params = factory.init_variables(model, 16, seed=0)["params"]
  labels = freezing.label_params(params, registry.get_method("vpt_deep").trainable_rules)
  schedule = lambda step: 0.1
  # SGD with momentum (VPT's optimizer): its update is proportional to the
  # gradient, so rounding noise is not amplified as by Adam's normalised first
  # steps, and the momentum is optimizer state whose dtype the tests check.
  tx = optimizers.make_optimizer(labels, name="sgd", learning_rate=schedule,
                                 weight_decay=1e-4)
  state = {"step": jnp.zeros([], jnp.int32), "params": params,
           "opt_state": jax.jit(tx.init)(params)}
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (BATCH, 16, 16, 3), dtype=np.uint8),
           "label": rng.integers(0, NUM_CLASSES, (BATCH,)).astype(np.int32)}
  step_fn = jax.jit(steps.make_train_step(model, labels, tx, schedule, **MEAN_STD))
  final, history = state, []
  for _ in range(num_steps):
    final, metrics = step_fn(final, batch, jax.random.key(1))
    history.append(metrics)
  return model, state, batch, step_fn, final, history


@pytest.mark.numerics
def test_bfloat16_loss_tracks_float32():
  full = np.array([float(m["loss"]) for m in _run("float32")[-1]])
  mixed = np.array([float(m["loss"]) for m in _run("bfloat16")[-1]])
  # The run learns (the comparison is over a moving trajectory) ...
  assert full[-1] < 0.8 * full[0], full
  # ... bfloat16 follows it within the tolerance, and really computes differently.
  np.testing.assert_allclose(mixed, full, rtol=LOSS_RTOL)
  assert not np.array_equal(mixed, full)


def _float_dtypes(tree) -> set:
  return {str(leaf.dtype) for leaf in jax.tree.leaves(tree)
          if jnp.issubdtype(leaf.dtype, jnp.floating)}


def test_bfloat16_keeps_parameters_optimizer_state_and_loss_float32():
  model, state, batch, _, final, history = _run("bfloat16")
  assert _float_dtypes(state["params"]) == {"float32"}
  assert _float_dtypes(final["params"]) == {"float32"}
  assert _float_dtypes(final["opt_state"]) == {"float32"}
  # The optimizer state is not empty: the trainable leaves have their momentum.
  assert sum(leaf.size for leaf in jax.tree.leaves(final["opt_state"])) > 0
  for name in ("loss", "grad_norm"):
    assert history[-1][name].dtype == jnp.float32, name
  images = normalization_lib.normalize_images(batch["image"], **MEAN_STD)
  apply = jax.jit(model.apply, static_argnames="return_features")
  variables = {"params": final["params"]}
  assert apply(variables, images).dtype == jnp.float32
  assert apply(variables, images, return_features=True).dtype == jnp.float32


TENSOR = re.compile(r"tensor<((?:\d+x)*)(\w+)>")


def _matmuls(hlo_text: str) -> list[tuple[str, list[tuple[tuple[int, ...], str]]]]:
  """Every dot_general / convolution line as (op, [(shape, element type), ...])."""
  found = []
  for line in hlo_text.splitlines():
    op = next((o for o in ("stablehlo.dot_general", "stablehlo.convolution") if o in line),
              None)
    if op is None:
      continue
    # The type signature follows the last " : ".
    signature = line.rsplit(" : ", 1)[1]
    tensors = [(tuple(int(d) for d in dims.split("x") if d), element)
               for dims, element in TENSOR.findall(signature)]
    found.append((op, tensors))
  return found


def _step_matmuls(dtype):
  _, state, batch, step_fn, _, _ = _run(dtype)
  return _matmuls(step_fn.lower(state, batch, jax.random.key(1)).as_text())


def test_bfloat16_backbone_matmuls_in_lowered_step():
  head, backbone = [], []
  for op, tensors in _step_matmuls("bfloat16"):
    # The head's matmuls (forward, kernel gradient, feature gradient) are the
    # only ones with the class dimension.
    (head if any(NUM_CLASSES in shape for shape, _ in tensors) else backbone).append(
        (op, tensors))
  assert len(head) == 3, head
  assert all(element == "f32" for _, tensors in head for _, element in tensors), head
  # 2 blocks x (q, k, v, 2 attention einsums, out, 2 MLP) forward and their
  # input gradients, and the patch convolution: all bfloat16.
  assert len(backbone) >= 2 * 8 * 2, len(backbone)
  assert any(op == "stablehlo.convolution" for op, _ in backbone)
  not_bf16 = [(op, t) for op, t in backbone if any(e != "bf16" for _, e in t)]
  assert not not_bf16, not_bf16


def test_float32_model_has_no_bfloat16_matmul():
  elements = {e for _, tensors in _step_matmuls("float32") for _, e in tensors}
  assert elements == {"f32"}


def _primitive_input_dtypes(jaxpr, found=None) -> dict:
  """{primitive name: {tuple of input dtypes}} over a jaxpr and its sub-jaxprs."""
  found = collections.defaultdict(set) if found is None else found
  for eqn in jaxpr.eqns:
    found[eqn.primitive.name].add(tuple(str(v.aval.dtype) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _primitive_input_dtypes(inner, found)
  return found


@pytest.mark.parametrize("method", ["vpt_deep", "full"])
def test_bfloat16_keeps_softmax_and_layernorm_statistics_in_float32(method):
  """The README's promise: bfloat16 matmuls, float32 softmax and LayerNorm statistics.

  In the traced forward the only exponentials are the attention softmax's, the
  only max reductions its stabiliser, the only sums its normaliser and the
  LayerNorm means and variances, the only rsqrt LayerNorm's: all float32,
  while the backbone's matmuls run in bfloat16.
  """
  spec = dict(_spec("bfloat16"), method=method)
  if method == "full":
    spec.update(num_prompts=0, prompt_dropout=0.0)
  model = factory.build_model(spec, NUM_CLASSES)
  shapes = factory.variable_shapes(model, 16)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(shapes, jnp.zeros((2, 16, 16, 3)))
  found = _primitive_input_dtypes(jaxpr.jaxpr)
  for primitive in ("exp", "reduce_max", "reduce_sum", "rsqrt"):
    assert found[primitive] == {("float32",)}, (primitive, found[primitive])
  assert ("bfloat16", "bfloat16") in found["dot_general"]


# The methods of issue 13 (adapters, re-parameterisable methods, VQT): each one's
# own computation sits inside the bfloat16 backbone, where a float32 parameter
# left uncast would silently promote the residual stream to float32.
ISSUE_13_METHODS = ("houlsby", "adaptformer", "adapter_plus", "convpass", "ssf", "difffit",
                    "ln_tune", "fact_tt", "fact_tk", "repadapter", "vqt")
# A batch that is no other dimension of the tiny models (width 16, MLP 32,
# head dim 8, 3 channels, 3 prompts, 7 classes, bottlenecks and ranks <= 8).
ODD_BATCH = 5


def _method_spec(method):
  config = common.base_config()
  config.method = method
  config.model.update(variant="test/4", image_size=16, dtype="bfloat16")
  config.adaptformer.bottleneck = 8  # its default 64 exceeds the tiny width
  return factory.model_spec(config)


@functools.lru_cache(maxsize=None)
def _lowered_method_step(method):
  """The lowered (not compiled) train step of the tiny bf16 model of ``method``: its matmuls."""
  model = factory.build_model(_method_spec(method), NUM_CLASSES)
  params = factory.variable_shapes(model, 16)["params"]
  labels = freezing.label_params(params, registry.get_method(method).trainable_rules)
  tx = optimizers.make_optimizer(labels, name="sgd", learning_rate=lambda step: 0.1,
                                 weight_decay=1e-4)
  state = {"step": jax.ShapeDtypeStruct([], jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params)}
  batch = {"image": jax.ShapeDtypeStruct((ODD_BATCH, 16, 16, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((ODD_BATCH,), jnp.int32)}
  step_fn = jax.jit(steps.make_train_step(model, labels, tx, lambda step: 0.1, **MEAN_STD))
  return _matmuls(step_fn.lower(state, batch, jax.random.key(1)).as_text())


@pytest.mark.parametrize("method", ISSUE_13_METHODS)
def test_bfloat16_method_matmuls_on_activations_are_bfloat16(method):
  """Every matmul over the batch but the head's (forward, input and weight gradients) is bf16.

  Matmuls without the batch dimension build weights from parameters (FacT-TK's
  core tensor times its layer factors), in float32 like the parameters, then cast.
  """
  head, on_batch = [], []
  for op, tensors in _lowered_method_step(method):
    if any(NUM_CLASSES in shape for shape, _ in tensors):
      head.append(tensors)
    elif any(ODD_BATCH in shape for shape, _ in tensors):
      on_batch.append((op, tensors))
  assert len(head) == 3, head
  assert all(element == "f32" for tensors in head for _, element in tensors), head
  assert len(on_batch) >= 2 * 8 * 2, len(on_batch)  # 2 blocks x 8 matmuls, forward + backward
  not_bf16 = [(op, t) for op, t in on_batch if any(e != "bf16" for _, e in t)]
  assert not not_bf16, not_bf16


@pytest.mark.parametrize("method", ISSUE_13_METHODS)
def test_bfloat16_method_blocks_stay_bfloat16_with_float32_statistics(method):
  """Each encoder block returns bf16 (the method did not promote the residual stream),
  while the softmax and LayerNorm statistics are float32, as for VPT-deep and full."""
  model = factory.build_model(_method_spec(method), NUM_CLASSES)
  shapes = factory.variable_shapes(model, 16)
  images = jnp.zeros((2, 16, 16, 3))
  _, captured = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
      shapes, images)
  blocks = {path: {str(leaf.dtype) for leaf in jax.tree.leaves(value)}
            for path, value in trees.flatten(captured["intermediates"]).items()
            if re.search(r"encoderblock_\d+/__call__$", path)}
  assert len(blocks) == 2 and all(d == {"bfloat16"} for d in blocks.values()), blocks
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(shapes, images)
  found = _primitive_input_dtypes(jaxpr.jaxpr)
  for primitive in ("exp", "reduce_max", "rsqrt"):
    assert found[primitive] == {("float32",)}, (primitive, found[primitive])
