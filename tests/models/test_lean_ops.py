"""models/lean_ops: the same forward values as flax/JAX, textbook gradients, one kept tensor.

Expectations are independent of the module: float64 NumPy formulas for the
gradients (derived by hand below), flax's and JAX's own ops for the forward
values (bit for bit), JAX's residual listing for what the backward pass keeps,
and XLA's buffer sizes for what the compiled program holds.
"""

import contextlib
import io
import math

import flax.linen as nn
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from tests import tolerances
from vpt_jax.models import lean_ops

SHAPE = (3, 7, 32)


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(0.5, 2.0, SHAPE).astype(np.float32)
  grad = rng.normal(0.0, 1.0, SHAPE).astype(np.float32)
  scale = rng.normal(1.0, 0.2, SHAPE[-1:]).astype(np.float32)
  bias = rng.normal(0.0, 0.2, SHAPE[-1:]).astype(np.float32)
  return x, grad, scale, bias


def _vjp(function, *arguments, grad):
  _, pullback = jax.vjp(function, *arguments)
  return pullback(jnp.asarray(grad))


def _erf(values):
  return np.vectorize(math.erf)(values)


def test_forwards_equal_flax_and_jax_bit_for_bit():
  x, _, scale, bias = _inputs()
  variables = {"params": {"scale": scale, "bias": bias}}
  flax_norm = nn.LayerNorm(epsilon=1e-6).apply(variables, x)
  np.testing.assert_array_equal(lean_ops.LayerNorm(epsilon=1e-6).apply(variables, x), flax_norm)
  np.testing.assert_array_equal(lean_ops.gelu(x), jax.nn.gelu(x, approximate=False))
  np.testing.assert_array_equal(lean_ops.softmax(x, -1), jax.nn.softmax(x, axis=-1))


def test_layer_norm_module_has_flax_parameters():
  x = _inputs()[0]
  ours = lean_ops.LayerNorm().init(jax.random.key(0), x)["params"]
  flax_params = nn.LayerNorm().init(jax.random.key(0), x)["params"]
  assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(
      lambda a: (a.shape, a.dtype), flax_params)
  np.testing.assert_array_equal(ours["scale"], flax_params["scale"])


@pytest.mark.numerics
def test_gelu_gradient_matches_the_derivative_of_x_phi_x():
  x, grad, _, _ = _inputs()
  wide = x.astype(np.float64)
  derivative = 0.5 * (1 + _erf(wide / np.sqrt(2))) + wide * np.exp(-wide ** 2 / 2) / np.sqrt(
      2 * np.pi)
  (ours,) = _vjp(lean_ops.gelu, x, grad=grad)
  np.testing.assert_allclose(ours, grad * derivative, atol=tolerances.rounding_atol(
      np.max(np.abs(grad * derivative)), 8), rtol=0)


@pytest.mark.numerics
def test_softmax_gradient_matches_the_jacobian():
  x, grad, _, _ = _inputs()
  wide = x.astype(np.float64)
  weights = np.exp(wide - wide.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  # J = diag(y) - y y^T, so J^T g = y * g - y (y . g).
  expected = weights * grad - weights * np.sum(weights * grad, -1, keepdims=True)
  (ours,) = _vjp(lambda v: lean_ops.softmax(v, -1), x, grad=grad)
  np.testing.assert_allclose(ours, expected, atol=tolerances.rounding_atol(
      np.max(np.abs(grad)), SHAPE[-1]), rtol=0)


@pytest.mark.numerics
def test_layer_norm_gradients_match_the_textbook_formulas():
  x, grad, scale, bias = _inputs()
  wide, grad64 = x.astype(np.float64), grad.astype(np.float64)
  mean = wide.mean(-1, keepdims=True)
  inverse_sigma = 1 / np.sqrt(wide.var(-1, keepdims=True) + 1e-6)
  x_hat = (wide - mean) * inverse_sigma
  grad_x_hat = grad64 * scale
  expected_x = inverse_sigma * (grad_x_hat - grad_x_hat.mean(-1, keepdims=True)
                                - x_hat * (grad_x_hat * x_hat).mean(-1, keepdims=True))
  ours_x, ours_scale, ours_bias = _vjp(
      lambda v, s, b: lean_ops.layer_norm(v, s, b, 1e-6), x, scale, bias, grad=grad)
  # Fast (E[x^2] - E[x]^2) variance of values near 2.5: its rounding scales with E[x^2].
  atol = tolerances.rounding_atol(np.max(np.abs(expected_x)) * np.mean(wide ** 2), SHAPE[-1])
  np.testing.assert_allclose(ours_x, expected_x, atol=atol, rtol=0)
  rows = math.prod(SHAPE[:-1])
  np.testing.assert_allclose(ours_scale, np.sum(grad64 * x_hat, (0, 1)),
                             atol=tolerances.rounding_atol(np.max(np.abs(grad * x_hat)), rows),
                             rtol=0)
  np.testing.assert_allclose(ours_bias, np.sum(grad64, (0, 1)),
                             atol=tolerances.rounding_atol(np.max(np.abs(grad)), rows), rtol=0)


def _kept_shapes(function, x):
  """The shapes of the residuals JAX keeps for ``function``'s backward, args excluded."""
  listing = io.StringIO()
  with contextlib.redirect_stdout(listing):
    ad_checkpoint.print_saved_residuals(lambda v: jnp.sum(jnp.sin(function(v))), x)
  return [line.split(" ")[0] for line in listing.getvalue().splitlines()
          if "from the argument" not in line and "output of cos" not in line
          and "constant" not in line and "literal" not in line]


def test_backward_keeps_one_full_size_tensor_of_gelu_and_layer_norm():
  """GELU keeps only its input (the argument here), LayerNorm only x_hat."""
  x, _, scale, bias = _inputs()
  full = "f32[3,7,32]"
  variables = {"params": {"scale": scale, "bias": bias}}
  assert _kept_shapes(lean_ops.gelu, x).count(full) == 0
  assert _kept_shapes(lambda v: jax.nn.gelu(v, approximate=False), x).count(full) == 3
  kept = _kept_shapes(lambda v: lean_ops.layer_norm(v, scale, bias, 1e-6), x)
  assert kept.count(full) == 1 and kept.count("f32[3,7,1]") == 1  # x_hat and 1 / sigma
  assert _kept_shapes(lambda v: nn.LayerNorm().apply(variables, v), x).count(full) == 3


def _temp_bytes(gradient, *arguments):
  return jax.jit(gradient).lower(*arguments).compile().memory_analysis().temp_size_in_bytes


def test_compiled_mlp_gradient_holds_one_tensor_less_with_lean_gelu():
  """When the next matmul needs GELU's output (the MLP's second projection),
  the compiled gradient's scratch is at least one input-sized tensor smaller.
  This needs the barrier in the backward pass: without it XLA merges the
  backward's erfc with the forward's and keeps it alive until then."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(512, 1024)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(1024, 64)), jnp.float32)

  def scratch(activation):
    chain = lambda v, w: jnp.sum(jnp.sin(activation(jnp.sin(v)) @ w))
    return _temp_bytes(jax.grad(chain, argnums=(0, 1)), x, weights)

  plain = scratch(lambda v: jax.nn.gelu(v, approximate=False))
  assert scratch(lean_ops.gelu) <= plain - x.size * 4


def test_compiled_attention_gradient_holds_one_weights_tensor_less_with_lean_softmax():
  """Attention's value matmul needs the softmax weights; the plain softmax
  also keeps its exp, the lean one does not."""
  rng = np.random.default_rng(0)
  query, key, value = (jnp.asarray(rng.normal(size=(8, 4, 128, 32)), jnp.float32)
                       for _ in range(3))

  def scratch(softmax):
    def attention(q, k, v):
      weights = softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k))
      return jnp.sum(jnp.sin(jnp.einsum("bhqk,bhkd->bhqd", weights, v)))
    return _temp_bytes(jax.grad(attention, argnums=(0, 1, 2)), query, key, value)

  plain = scratch(lambda v: jax.nn.softmax(v, axis=-1))
  assert scratch(lambda v: lean_ops.softmax(v, -1)) <= plain - 8 * 4 * 128 * 128 * 4


def test_bfloat16_inputs_give_bfloat16_gradients():
  x, grad, scale, bias = _inputs()
  low = jnp.asarray(x, jnp.bfloat16)
  (grad_gelu,) = _vjp(lean_ops.gelu, low, grad=jnp.asarray(grad, jnp.bfloat16))
  assert grad_gelu.dtype == jnp.bfloat16
  norm = lean_ops.LayerNorm(dtype=jnp.bfloat16)
  variables = {"params": {"scale": scale, "bias": bias}}
  assert norm.apply(variables, low).dtype == jnp.bfloat16
  grad_x = jax.grad(lambda v: jnp.sum(norm.apply(variables, v).astype(jnp.float32)))(low)
  assert grad_x.dtype == jnp.bfloat16


class _TwoDropouts(nn.Module):
  """Two dropouts at the names flax gives them, from either class."""
  dropout: type

  @nn.compact
  def __call__(self, x):
    first = self.dropout(0.3)(x, deterministic=False)
    return first, self.dropout(0.3, broadcast_dims=(1,))(x, deterministic=False)


def test_dropout_draws_flax_masks_and_values_bit_for_bit():
  x = jnp.asarray(_inputs()[0])
  rngs = {"dropout": jax.random.key(7)}
  ours = _TwoDropouts(lean_ops.Dropout).apply({}, x, rngs=rngs)
  theirs = _TwoDropouts(nn.Dropout).apply({}, x, rngs=rngs)
  for mine, flax_value in zip(ours, theirs):
    np.testing.assert_array_equal(mine, flax_value)
  dropped = np.asarray(ours[0]) == 0
  assert 0.2 < dropped.mean() < 0.4  # about the rate
  # broadcast_dims=(1,): one decision per (example, channel), shared by axis 1.
  shared = np.asarray(ours[1]) == 0
  assert np.all(shared == shared[:, :1])


class _DropoutChain(nn.Module):
  """Four layers of sin then dropout: every mask lives until the backward pass."""
  dropout: type

  @nn.compact
  def __call__(self, x):
    for _ in range(4):
      x = self.dropout(0.1)(jnp.sin(x), deterministic=False)
    return x


def test_dropout_backward_keeps_the_mask_packed_into_bits():
  """flax's mask is a full-size bool whose random bits XLA keeps (4 bytes per
  element, at ViT-B/16 scale); ours is kept packed, 8 elements per byte."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 256)), jnp.float32)

  def kept(dropout):
    listing = io.StringIO()
    loss = lambda v: jnp.sum(_DropoutChain(dropout).apply({}, v, rngs={
        "dropout": jax.random.key(0)}))
    with contextlib.redirect_stdout(listing):
      ad_checkpoint.print_saved_residuals(loss, x)
    return [line.split(" ")[0] for line in listing.getvalue().splitlines()]

  assert kept(nn.Dropout).count("bool[4,8,256]") == 4
  ours = kept(lean_ops.Dropout)
  assert not any(shape.startswith("bool") for shape in ours)
  assert ours.count("u8[4,8,32]") == 4  # 256 / 8 bytes per row


@pytest.mark.parametrize("shape, p", [((3, 5), 0.9), ((16, 7, 31), 0.5), ((7,), 0.1),
                                      ((2, 3, 4, 5), 0.77)])
def test_bernoulli_draws_jax_booleans_bit_for_bit(shape, p):
  for key in (jax.random.key(3), jax.random.split(jax.random.key(5))[1], jax.random.PRNGKey(9)):
    np.testing.assert_array_equal(lean_ops.bernoulli(key, p, shape),
                                  jax.random.bernoulli(key, p, shape))


def test_bernoulli_of_an_rbg_key_is_jax_own():
  key = jax.random.key(0, impl="rbg")
  np.testing.assert_array_equal(lean_ops.bernoulli(key, 0.5, (4, 9)),
                                jax.random.bernoulli(key, 0.5, (4, 9)))


# ------------------------------------------------------------ dense_dot_general

# (lhs shape, kernel shape, contracted axes k): nn.Dense, and nn.DenseGeneral
# as attention's q/k/v (D -> (H, D/H)) and out ((H, D/H) -> D) projections use it.
DENSE_CASES = [((3, 7, 32), (32, 24), 1), ((3, 7, 32), (32, 4, 6), 1),
               ((3, 7, 4, 6), (4, 6, 32), 2)]


def _dense(lhs, kernel, k, dot_general):
  dims = ((tuple(range(lhs.ndim - k, lhs.ndim)), tuple(range(k))), ((), ()))
  return dot_general(lhs, kernel, dims)


@pytest.mark.numerics
@pytest.mark.parametrize("lhs_shape, kernel_shape, k", DENSE_CASES)
def test_dense_dot_general_gradients_match_float64(lhs_shape, kernel_shape, k):
  rng = np.random.default_rng(1)
  lhs = rng.normal(0.0, 1.0, lhs_shape).astype(np.float32)
  kernel = rng.normal(0.0, 0.3, kernel_shape).astype(np.float32)
  out = _dense(lhs, kernel, k, jax.lax.dot_general)
  grad = rng.normal(0.0, 1.0, out.shape).astype(np.float32)
  ours = _dense(lhs, kernel, k, lean_ops.dense_dot_general)
  np.testing.assert_array_equal(ours, out)  # the forward is JAX's own product
  grad_lhs, grad_kernel = _vjp(lambda a, b: _dense(a, b, k, lean_ops.dense_dot_general),
                               lhs, kernel, grad=grad)
  # Rows = tokens, C = contracted (input) axes, F = feature axes, in float64.
  rows, inner = int(np.prod(lhs_shape[:-k])), int(np.prod(kernel_shape[:k]))
  lhs2, kernel2 = lhs.reshape(rows, inner).astype(np.float64), kernel.reshape(inner, -1)
  grad2 = grad.reshape(rows, -1).astype(np.float64)
  expected_lhs, expected_kernel = grad2 @ kernel2.T, lhs2.T @ grad2
  bound = lambda a, b, n: tolerances.rounding_atol(np.max(np.abs(a) @ np.abs(b)), n)
  np.testing.assert_allclose(np.asarray(grad_lhs).reshape(rows, inner), expected_lhs,
                             rtol=0, atol=bound(grad2, kernel2.T, grad2.shape[1]))
  np.testing.assert_allclose(np.asarray(grad_kernel).reshape(inner, -1), expected_kernel,
                             rtol=0, atol=bound(lhs2.T, grad2, rows))
  assert grad_kernel.shape == kernel.shape and grad_lhs.shape == lhs.shape


def _primitives(jaxpr) -> set:
  return {equation.primitive.name for equation in jaxpr.eqns}


def test_dense_kernel_gradient_needs_no_transpose():
  lhs, kernel = jnp.ones((3, 7, 32)), jnp.ones((32, 24))
  kernel_grad = lambda dot: jax.make_jaxpr(jax.grad(
      lambda w: jnp.sum(_dense(lhs, w, 1, dot) ** 2)))(kernel).jaxpr
  # JAX's own rule forms (F, C) and transposes it into the kernel's layout.
  assert "transpose" in _primitives(kernel_grad(jax.lax.dot_general))
  assert "transpose" not in _primitives(kernel_grad(lean_ops.dense_dot_general))


def test_frozen_kernel_costs_no_gradient_product():
  lhs, kernel = jnp.ones((3, 7, 32)), jnp.ones((32, 24))
  input_grad = jax.jit(jax.grad(
      lambda x: jnp.sum(_dense(x, kernel, 1, lean_ops.dense_dot_general) ** 2)))
  hlo = input_grad.lower(lhs).compile().as_text()
  # The forward product and the input gradient's; the kernel's is dead code.
  assert hlo.count(" dot(") == 2, hlo


@pytest.mark.parametrize("lhs_shape, kernel_shape, k", DENSE_CASES[1:])
def test_frozen_attention_kernel_is_read_in_place_by_the_input_gradient(lhs_shape, kernel_shape,
                                                                        k):
  # With the heads as separate contracted axes, XLA:CPU used to copy each
  # q/k/v/out kernel into a transposed layout at every step.
  input_grad = jax.jit(jax.grad(lambda x, w: jnp.sum(
      _dense(x, w, k, lean_ops.dense_dot_general) ** 2)))
  hlo = input_grad.lower(jnp.ones(lhs_shape), jnp.ones(kernel_shape)).compile().as_text()
  moved = [line for line in hlo.splitlines()
           if " transpose(" in line or " copy(" in line]
  assert not moved, "\n".join(moved)


def test_dense_dot_general_refuses_other_dimension_numbers():
  with pytest.raises(ValueError, match="trailing lhs axes"):
    lean_ops.dense_dot_general(jnp.ones((4, 3)), jnp.ones((4, 5)), (((0,), (0,)), ((), ())))
