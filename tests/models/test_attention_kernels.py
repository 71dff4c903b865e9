"""The attention kernels (models/attention_kernels.py) against a float64 NumPy attention and
its hand-derived gradients, alone and inside the ViT (E2VPT's key-value prompts, VPT-deep) and
Swin (shift mask) models; the recompute kernel's backward keeps no attention weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_fixtures
import numpy_swin
import numpy_vit
import tolerances
from vpt_jax import errors
from vpt_jax.methods import factory
from vpt_jax.models import attention_kernels
from vpt_jax.models import swin_blocks
from vpt_jax.models import vit_blocks

KERNELS = attention_kernels.ATTENTION_KERNELS


def numpy_attention(query, key, value, bias=None):
  """float64 softmax(q k^T / sqrt(H) + bias) v in the BTNH layout (B, T, N, H)."""
  query, key, value = (np.asarray(t, np.float64) for t in (query, key, value))
  logits = np.einsum("btnh,bsnh->bnts", query, key) / np.sqrt(query.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", weights, value)


def _inputs(dtype, seed=0, batch=2, queries=5, keys=7, heads=2, head_dim=8):
  """Random q (B, T, N, H), k, v (B, S, N, H), a bias with masked (-100) entries."""
  rng = np.random.default_rng(seed)
  # q and k at 0.5: logits O(1), where bfloat16's bound is tight enough to
  # tell a defect (see _bound); v at 1.
  query, key, value = (jnp.asarray(scale * rng.standard_normal(shape), dtype)
                       for scale, shape in ((0.5, (batch, queries, heads, head_dim)),
                                            (0.5, (batch, keys, heads, head_dim)),
                                            (1.0, (batch, keys, heads, head_dim))))
  bias = 0.5 * rng.standard_normal((1, heads, queries, keys))
  bias[..., :2] -= 100.0 * (rng.random((1, 1, queries, 2)) < 0.5)  # Swin's additive mask
  return query, key, value, jnp.asarray(bias, jnp.float32)


def _bound(dtype, query, key, value, bias):
  """The rounding bound of one kernel against the exact value.

  float32: a logit is an H-long sum (error H eps |q||k|), a softmax perturbed by
  delta in its logits moves the output by at most 2 delta max|v|, and the output
  is an S-long sum: rounding_atol(max|v| (1 + 2 max|q| max|k|), H + S).
  bfloat16: ``tolerances.bf16_attention_atol`` of the largest unmasked logit.
  """
  q, k, v = (np.asarray(t, np.float64) for t in (query, key, value))
  if dtype == jnp.bfloat16:
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    logits = logits + (0.0 if bias is None else np.asarray(bias, np.float64))
    unmasked = np.abs(logits)[logits > -50.0]
    return tolerances.bf16_attention_atol(float(unmasked.max()), float(np.abs(v).max()))
  largest_product = float(np.abs(q).max() * np.abs(k).max())
  return tolerances.rounding_atol(np.abs(v).max() * (1 + 2 * largest_product),
                                  q.shape[-1] + k.shape[1])


@pytest.mark.numerics
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_numpy(kernel, dtype, with_bias):
  query, key, value, bias = _inputs(dtype)
  bias = bias if with_bias else None
  attended = jax.jit(attention_kernels.attend, static_argnums=3)(query, key, value, kernel, bias)
  assert attended.shape == query.shape and attended.dtype == dtype
  expected = numpy_attention(query.astype(jnp.float32), key.astype(jnp.float32),
                             value.astype(jnp.float32), bias)
  atol = _bound(dtype, query, key, value, bias)
  assert atol < 0.1 * np.abs(expected).max()  # a dropped bias or a wrong scale is O(1)
  np.testing.assert_allclose(np.asarray(attended, np.float64), expected, rtol=0, atol=atol)


def numpy_attention_gradients(query, key, value, bias, grad):
  """float64 gradients of sum(attention(q, k, v, bias) * grad) with respect to q, k, v
  and a (1, N, T, S) bias, from the chain rule written out by hand."""
  q, k, v, g = (np.asarray(t, np.float64) for t in (query, key, value, grad))
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale + np.asarray(bias, np.float64)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  grad_value = np.einsum("bnts,btnh->bsnh", weights, g)
  grad_weights = np.einsum("btnh,bsnh->bnts", g, v)
  grad_logits = weights * (grad_weights - (grad_weights * weights).sum(-1, keepdims=True))
  grad_query = np.einsum("bnts,bsnh->btnh", grad_logits, k) * scale
  grad_key = np.einsum("bnts,btnh->bsnh", grad_logits, q) * scale
  return grad_query, grad_key, grad_value, grad_logits.sum(0, keepdims=True)


@pytest.mark.numerics
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_gradients_match_numpy(kernel):
  query, key, value, bias = _inputs(jnp.float32)
  grad = jnp.asarray(np.random.default_rng(1).standard_normal(query.shape), jnp.float32)
  loss = lambda *args: jnp.sum(attention_kernels.attend(*args[:3], kernel, args[3]) * grad)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(query, key, value, bias)
  expected = numpy_attention_gradients(query, key, value, bias, grad)
  # Each gradient is at most three chained float32 sums (over H, S or T) of
  # products bounded by max|g| max|v| (1 + 2 max|q| max|k|) max(|q|, |k|, 1).
  q, k, v, g = (float(np.abs(np.asarray(t)).max()) for t in (query, key, value, grad))
  magnitude = g * v * (1 + 2 * q * k) * max(q, k, 1.0)
  atol = tolerances.rounding_atol(magnitude, sum(query.shape[1:2] + key.shape[1:2]
                                                 + query.shape[3:]), steps=3)
  for name, got, want in zip(("query", "key", "value", "bias"), grads, expected):
    assert got.shape == want.shape, name
    assert atol < 0.1 * np.abs(want).max(), name  # a wrong scale or a lost sum is larger
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=atol,
                               err_msg=name)


def test_recompute_keeps_no_attention_weights_for_the_backward_pass():
  """Four attention layers, as in a frozen backbone (the input's gradient only): the
  einsum kernel keeps each layer's (B, N, T, S) float32 weights until the backward
  pass, the recompute kernel keeps none of them."""
  batch, tokens, heads, head_dim, layers = 2, 64, 4, 8, 4
  x = jax.random.normal(jax.random.key(0), (batch, tokens, heads, head_dim))

  def temp_bytes(kernel):
    def loss(x):
      for _ in range(layers):
        x = jnp.tanh(attention_kernels.attend(x, x, x, kernel) + x)
      return jnp.sum(x)
    return jax.jit(jax.grad(loss)).lower(x).compile().memory_analysis().temp_size_in_bytes
  weights_bytes = batch * heads * tokens * tokens * 4
  saved = temp_bytes("einsum") - temp_bytes("recompute")
  # All but the last layer's weights (which the backward pass reads first).
  assert saved >= (layers - 1) * weights_bytes, (saved, weights_bytes)


@pytest.mark.numerics
def test_masked_keys_get_no_weight():
  """A -100 bias on every key but one leaves exactly that key's value (both kernels)."""
  query, key, value, _ = _inputs(jnp.float32)
  bias = jnp.full((1, 1, 1, key.shape[1]), -100.0).at[..., 3].set(0.0)
  for kernel in KERNELS:
    attended = attention_kernels.attend(query, key, value, kernel, bias)
    expected = np.broadcast_to(np.asarray(value)[:, 3:4], attended.shape)
    np.testing.assert_allclose(attended, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_recompute_runs_the_einsum_forward_bit_for_bit(dtype):
  """What serving relies on (``forward_kernel``): a task trained with recompute
  and one trained with einsum share one stacked forward pass."""
  query, key, value, bias = _inputs(dtype)
  attend = jax.jit(attention_kernels.attend, static_argnums=3)
  np.testing.assert_array_equal(attend(query, key, value, "recompute", bias),
                                attend(query, key, value, "einsum", bias))
  assert attention_kernels.forward_kernel("recompute") == "einsum"
  assert attention_kernels.forward_kernel("dot_product") == "dot_product"


def test_unknown_kernel_is_one_line_user_error():
  with pytest.raises(errors.UserError, match="model.attention") as raised:
    attention_kernels.check_kernel("flash")
  assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------
# Inside the modules: ViT's Attention with E2VPT's extra_kv, Swin's
# WindowAttention with prompts, the relative position bias and the shift mask.


# float32 only: the modules add the wiring (extra_kv, prompts, bias and mask
# reach the kernel on both paths); bfloat16's numerics are the kernel's, tested
# above (a worst-case bound carried through the projections is too loose to
# tell a defect).
ATOL = tolerances.FORWARD_VS_NUMPY["atol"]


@pytest.mark.numerics
@pytest.mark.parametrize("kernel", KERNELS)
def test_vit_attention_with_extra_kv_matches_numpy(kernel):
  rng = np.random.default_rng(4)
  inputs_q, inputs_kv = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                         for s in ((2, 5, 16), (2, 7, 16)))
  kv_prompts = rng.standard_normal((3, 2, 8)).astype(np.float32)  # (N_kv, H, D/H)
  extra_kv = jnp.broadcast_to(kv_prompts, (2,) + kv_prompts.shape)
  module = vit_blocks.Attention(2, attention_kernel=kernel)
  params = module.init(jax.random.key(0), inputs_q, inputs_kv, extra_kv)["params"]
  out = jax.jit(lambda p: module.apply({"params": p}, inputs_q, inputs_kv, extra_kv))(params)
  ref_params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  expected = numpy_vit.attention(np.asarray(inputs_q, np.float64), ref_params,
                                 kv=np.asarray(inputs_kv, np.float64), kv_prompts=kv_prompts)
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=0, atol=ATOL)


@pytest.mark.numerics
@pytest.mark.parametrize("kernel", KERNELS)
def test_swin_window_attention_with_mask_and_prompts_matches_numpy(kernel):
  """4 x 4 tokens, window 2, shift 1 (4 windows, all masked somewhere), 2 prompts."""
  batch, channels, heads, window, num_prompts = 2, 16, 2, 2, 2
  rng = np.random.default_rng(5)
  windows = jnp.asarray(rng.standard_normal((batch, 4, window * window, channels)), jnp.float32)
  prompts = jnp.asarray(rng.standard_normal((batch, num_prompts, channels)), jnp.float32)
  mask = numpy_swin.np_shift_mask(4, window, 1)
  assert (mask < 0).any(axis=(1, 2)).sum() >= 3  # the mask really acts
  module = swin_blocks.WindowAttention(heads, window, attention_kernel=kernel)
  params = module.init(jax.random.key(0), windows, prompts, mask)["params"]
  params = jax.tree.map(lambda p: 5.0 * p, params)  # std 0.1: attention not uniform
  window_out, prompt_out = jax.jit(
      lambda p: module.apply({"params": p}, windows, prompts, mask))(params)
  p64 = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  state = {"attn.qkv.weight": p64["qkv"]["kernel"].T, "attn.qkv.bias": p64["qkv"]["bias"],
           "attn.proj.weight": p64["proj"]["kernel"].T, "attn.proj.bias": p64["proj"]["bias"],
           "attn.relative_position_bias_table": p64["relative_position"]["bias"]}
  tokens = np.concatenate([np.repeat(np.asarray(prompts, np.float64)[:, None], 4, axis=1),
                           np.asarray(windows, np.float64)], axis=2)  # (B, nW, P + 4, C)
  expected = numpy_swin.np_attention(tokens.reshape(batch * 4, -1, channels), state, "attn.",
                                     heads, window, num_prompts, mask)
  expected = expected.reshape(batch, 4, num_prompts + window * window, channels)
  np.testing.assert_allclose(np.asarray(window_out, np.float64), expected[:, :, num_prompts:],
                             rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.asarray(prompt_out, np.float64),
                             expected[:, :, :num_prompts].mean(axis=1), rtol=0, atol=ATOL)


@pytest.mark.numerics
def test_swin_window_attention_gradients_agree_with_recompute():
  """Swin's trainable relative position bias and shift mask reach the recompute
  kernel's hand-written backward through flax and the vmap over windows; JAX's
  own differentiation of the einsum kernel is the independent path."""
  batch, channels, heads, window = 2, 16, 2, 2
  rng = np.random.default_rng(6)
  windows = jnp.asarray(rng.standard_normal((batch, 4, window * window, channels)), jnp.float32)
  prompts = jnp.asarray(rng.standard_normal((batch, 2, channels)), jnp.float32)
  mask = numpy_swin.np_shift_mask(4, window, 1)

  def gradients(kernel):
    module = swin_blocks.WindowAttention(heads, window, attention_kernel=kernel)
    params = module.init(jax.random.key(0), windows, prompts, mask)["params"]
    params = jax.tree.map(lambda p: 5.0 * p, params)  # std 0.1: attention not uniform
    def loss(p, w, pr):
      window_out, prompt_out = module.apply({"params": p}, w, pr, mask)
      return jnp.sum(jnp.sin(window_out)) + jnp.sum(jnp.cos(prompt_out))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, windows, prompts)
  einsum, recompute = gradients("einsum"), gradients("recompute")
  flat_einsum = dict(jax.tree_util.tree_leaves_with_path(einsum))
  for path, got in jax.tree_util.tree_leaves_with_path(recompute):
    want = np.asarray(flat_einsum[path], np.float64)
    # Two float32 evaluations of the same chain rule: each gradient is a sum of
    # at most batch x windows x tokens x channels products of its magnitude.
    atol = tolerances.rounding_atol(np.abs(want).max(), batch * 4 * 6 * channels)
    assert np.abs(want).max() > 0, path
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------
# The option flows from the config through the spec into the models.


def _spec(method, variant, kernel, **fields):
  spec = dict(method=method, variant=variant, image_size=32 if "swin" in variant else 16,
              dropout_rate=0.0, skip_dead_work=True, dtype="float32", remat="none",
              num_prompts=2, prompt_dropout=0.0, prompt_projection=-1, pool="original",
              attention=kernel)
  spec.update(fields)
  return spec


def test_config_sets_the_spec_only_when_not_the_default():
  config = checkpoint_fixtures.method_config("vpt_deep", "test/4", 16)
  assert "attention" not in factory.model_spec(config)  # earlier specs stay byte-equal
  config.model.attention = "dot_product"
  spec = factory.model_spec(config)
  assert spec["attention"] == "dot_product"
  assert factory.build_model(spec, 5).attention_kernel == "dot_product"
  for variant in ("swin-test/4w2", "dinov2-test/4-reg", "timm-vit-test4"):  # other families
    variant_spec = _spec("vpt_deep", variant, "dot_product")
    assert factory.build_model(variant_spec, 5).attention_kernel == "dot_product", variant


@pytest.mark.numerics
def test_e2vpt_vit_logits_agree_across_kernels():
  """The whole tiny E2VPT ViT (extra_kv in every block, VPT prompts) in float32."""
  def logits(kernel):
    spec = _spec("e2vpt", "test/4", kernel, e2vpt=dict(num_prompts=3, dropout=0.0))
    model = factory.build_model(spec, 5)
    params = factory.init_variables(model, 16, seed=0)["params"]
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim >= 2 else p, params)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, images))(params))
  einsum, dot_product = logits("einsum"), logits("dot_product")
  # Two float32 paths, each within FORWARD_VS_NUMPY of the exact forward, at
  # the logits' scale.
  atol = tolerances.FORWARD_VS_NUMPY["atol"] * max(float(np.abs(einsum).max()), 1.0)
  np.testing.assert_allclose(dot_product, einsum, rtol=0, atol=atol)
  assert not np.allclose(einsum, 0.0)


@pytest.mark.parametrize("method, variant, kernel", [
    ("vpt_deep", "test/4", "flash"),  # unknown name
    ("linear", "resnet-test", "dot_product"),  # no attention layers to run it
    ("linear", "resnet-test", "recompute"),
])
def test_spec_refuses_attention_it_cannot_honour(method, variant, kernel):
  with pytest.raises(errors.UserError, match="model.attention") as raised:
    factory.validate_spec(_spec(method, variant, kernel))
  assert "\n" not in str(raised.value)
