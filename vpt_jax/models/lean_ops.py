"""Softmax, exact GELU and LayerNorm whose backward pass keeps one tensor each.

JAX differentiates these ops through their primitives and so keeps every
intermediate the chain rule touches for the backward pass: exact GELU keeps
three tensors of its input's size (``x * 0.5``, ``erfc(-x / sqrt 2)`` and
``exp(-x^2 / 2)``), the softmax keeps its ``exp`` and its output, flax's
LayerNorm keeps ``x^2``, ``x - mean`` and the normalised ``x``. At ViT-B/16,
batch 16, they are 2.6 of the 3.1 GB that VPT-deep's step keeps
(``benchmarks/memory.py``). Here each is a ``jax.custom_vjp`` whose backward
pass reads only what PyTorch's autograd keeps for the same op:

* ``softmax``: its output y; dx = y * (g - sum(g * y));
* ``gelu``: its input x; dx = g * (Phi(x) + x * phi(x));
* ``layer_norm``: the normalised input x_hat (in the input's dtype) and
  1 / sigma, where PyTorch keeps x, its mean and 1 / sigma;
  dx = (g s - mean(g s) - x_hat mean(g s x_hat)) / sigma.

The forward passes are flax's and JAX's own formulas, operation for operation
(the same values, bit for bit), so switching to these ops changes gradients
only by rounding.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax(logits: jax.Array, axis: int = -1) -> jax.Array:
  """``jax.nn.softmax(logits, axis)``; the backward pass keeps only the output."""
  return jax.nn.softmax(logits, axis=axis)


def _softmax_forward(logits, axis):
  weights = jax.nn.softmax(logits, axis=axis)
  return weights, weights


def softmax_backward(weights: jax.Array, grad: jax.Array, axis: int = -1) -> jax.Array:
  """The logits' gradient from the softmax's output y and its gradient g (same shape):
  y * (g - sum(g * y)) over ``axis``."""
  return weights * (grad - jnp.sum(grad * weights, axis=axis, keepdims=True))


def _softmax_backward(axis, weights, grad):
  return (softmax_backward(weights, grad, axis),)


softmax.defvjp(_softmax_forward, _softmax_backward)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, ``jax.nn.gelu(x, approximate=False)``; the backward keeps only x."""
  return jax.nn.gelu(x, approximate=False)


def _gelu_forward(x):
  return jax.nn.gelu(x, approximate=False), x


def _gelu_backward(x, grad):
  # d/dx [x Phi(x)] = Phi(x) + x phi(x), in at least float32. The barrier
  # keeps XLA from sharing erfc's terms with the forward pass, which would
  # keep them alive until here and undo the saving.
  x = lax.optimization_barrier(x)
  wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  cdf = 0.5 * lax.erfc(-wide * np.sqrt(0.5).astype(wide.dtype))
  density = jnp.exp(-0.5 * wide * wide) * np.sqrt(0.5 / np.pi).astype(wide.dtype)
  return ((grad.astype(wide.dtype) * (cdf + wide * density)).astype(x.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)


def _statistics(x, epsilon):
  """flax's fast-variance statistics over the last axis: (mean, 1 / sqrt(var + eps)),
  each (..., 1) in float32 (or wider)."""
  wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(wide, axis=-1, keepdims=True)
  mean_square = jnp.mean(wide * wide, axis=-1, keepdims=True)
  variance = jnp.maximum(0.0, mean_square - mean * mean)
  return mean, lax.rsqrt(variance + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """flax ``nn.LayerNorm`` over the last axis: (..., D), scale and bias (D,) -> (..., D).

  The result is float32 (or wider); the caller casts it to its dtype.
  """
  mean, inverse_sigma = _statistics(x, epsilon)
  return (x - mean) * (inverse_sigma * scale) + bias


def _layer_norm_forward(x, scale, bias, epsilon):
  mean, inverse_sigma = _statistics(x, epsilon)
  centered = x - mean
  # Keeps x_hat (in x's dtype) and 1 / sigma: the backward pass then reads one
  # tensor and recomputes nothing (recomputing x_hat from x would need x
  # itself and a transient of its size per block, which XLA schedules early).
  x_hat = (centered * inverse_sigma).astype(x.dtype)
  return centered * (inverse_sigma * scale) + bias, (x_hat, inverse_sigma, scale)


def _layer_norm_backward(epsilon, residuals, grad):
  del epsilon
  x_hat, inverse_sigma, scale = residuals
  wide_x_hat = x_hat.astype(inverse_sigma.dtype)
  grad = grad.astype(inverse_sigma.dtype)
  summed_axes = tuple(range(grad.ndim - 1))
  grad_scale = jnp.sum(grad * wide_x_hat, axis=summed_axes).astype(scale.dtype)
  grad_bias = jnp.sum(grad, axis=summed_axes).astype(scale.dtype)
  grad_x_hat = grad * scale
  grad_x = inverse_sigma * (
      grad_x_hat - jnp.mean(grad_x_hat, axis=-1, keepdims=True)
      - wide_x_hat * jnp.mean(grad_x_hat * wide_x_hat, axis=-1, keepdims=True))
  return grad_x.astype(x_hat.dtype), grad_scale, grad_bias


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.Module):
  """Drop-in for ``nn.LayerNorm`` (last axis, scale and bias, fast variance) on ``layer_norm``.

  Same parameter names, shapes, initialisers and forward values as flax's;
  (..., D) -> (..., D) in ``dtype`` (or the promoted input and parameter dtype).
  """
  epsilon: float = 1e-6
  dtype: Optional[jnp.dtype] = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    return layer_norm(x, scale, bias, self.epsilon).astype(dtype)


class Dropout(nn.Module):
  """``nn.Dropout`` (same random bits, same values) whose backward keeps one bit per element.

  flax's bool mask costs more than its byte: XLA fuses the ``bits <
  threshold`` comparison into the mask's users, the backward pass's included,
  and so keeps the 32-bit random bits alive until then (4 bytes per element,
  0.9 GB at ViT-B/16 full fine-tuning, batch 16). Here the mask is packed into
  bits, and both passes unpack it (``drop_packed``). (...) -> same shape.
  """
  rate: float
  broadcast_dims: Sequence[int] = ()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    drawn = tuple(1 if axis in self.broadcast_dims else size for axis, size in enumerate(x.shape))
    keep = bernoulli(self.make_rng("dropout"), 1.0 - self.rate, drawn)
    return drop_packed(x, jnp.packbits(keep, axis=-1), self.rate, drawn[-1])


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(key1, key2, high, low):
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011), unrolled: (uint32 x4) -> uint32 x2.

  The same hash as JAX's, which on CPU lowers it as a five-step loop whose
  two uint32 arrays go through memory at every step; unrolled, XLA fuses the
  whole hash with what follows into one pass.
  """
  keys = (key1, key2, key1 ^ key2 ^ np.uint32(0x1BD11BDA))
  x = [high + keys[0], low + keys[1]]
  for step in range(5):
    for rotation in _THREEFRY_ROTATIONS[step % 2]:
      x[0] = x[0] + x[1]
      x[1] = x[0] ^ ((x[1] << np.uint32(rotation)) | (x[1] >> np.uint32(32 - rotation)))
    x = [x[0] + keys[(step + 1) % 3], x[1] + keys[(step + 2) % 3] + np.uint32(step + 1)]
  return x


def bernoulli(key: jax.Array, p: float, shape) -> jax.Array:
  """``jax.random.bernoulli(key, p, shape)``, the same booleans bit for bit, in one
  fused pass: on CPU, where JAX's threefry is a loop, about 50x faster for a
  ViT-B/16 MLP mask at batch 16 (0.74 -> 0.014 s measured on 2 busy cores).

  As JAX with ``jax_threefry_partitionable`` (its default): the counter of an
  element is its row-major index, the bits are the hash's two words xor-ed,
  and the uniform float is 1.bits[31:9] - 1.
  """
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  size = int(np.prod(shape))
  if (data.shape != (2,) or size >= 2 ** 32
      or not jax.config.jax_threefry_partitionable):
    # Another PRNG (rbg keys hold four words) or JAX's other counter layouts.
    return jax.random.bernoulli(key, p, shape)
  key = data
  low = lax.iota(np.uint32, size).reshape(shape)
  words = _threefry2x32(key[0], key[1], jnp.zeros_like(low), low)
  bits = words[0] ^ words[1]
  floats = lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000),
                                    np.float32) - np.float32(1.0)
  return floats < np.float32(p)


def _keep_mask(packed, shape, drawn_last: int):
  keep = jnp.unpackbits(packed, axis=-1, count=drawn_last).astype(bool)
  return jnp.broadcast_to(keep, shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def drop_packed(x: jax.Array, packed: jax.Array, rate: float, drawn_last: int) -> jax.Array:
  """flax's dropout formula, x / (1 - rate) where kept, else 0.

  ``packed``: the keep mask packed along the last axis (``jnp.packbits``), of
  x's shape where the mask was drawn in full and 1 where it broadcasts, the
  last axis ceil(drawn_last / 8) bytes (``drawn_last`` is x's last size or 1).
  """
  keep = _keep_mask(packed, x.shape, drawn_last)
  return lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _drop_packed_forward(x, packed, rate, drawn_last):
  return drop_packed(x, packed, rate, drawn_last), packed


def _drop_packed_backward(rate, drawn_last, packed, grad):
  # Dropout is linear and diagonal: its transpose is itself.
  return drop_packed(grad, packed, rate, drawn_last), None


drop_packed.defvjp(_drop_packed_forward, _drop_packed_backward)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> jax.Array:
  """``lax.dot_general`` of flax's Dense and DenseGeneral, kernel gradient in the kernel's layout.

  lhs (..., C...) contracts its k trailing axes with the k leading axes of the
  kernel rhs (C..., F...) -> (..., F...) (``dot_general=`` of ``nn.Dense`` and
  ``nn.DenseGeneral`` over trailing axes; any other dimension numbers raise).

  JAX's transpose rule forms the kernel gradient as grad^T lhs, shaped
  (F, C), and transposes it. XLA:CPU first transposes grad to put the
  contracted tokens last, and then fuses the final transpose into every
  reader of the gradient (the all-reduce, each AdamW moment), which read it
  with strides. Here the kernel gradient is one 2-D product over the token
  rows, lhs_rows^T grad_rows (C, T) x (T, F), which the CPU matmul takes as
  a transposed operand, written in the kernel's (C, F) layout. The input
  gradient contracts grad's flattened feature axes with the 2-D kernel,
  (..., F) x (C, F)^T, which reads the kernel in place. The forward pass is
  JAX's own product. When the kernel is
  frozen, the kernel gradient is unused and XLA removes it (and does not
  keep lhs for it).
  """
  (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = dimension_numbers
  k = len(lhs_contracting)
  if (lhs_batch or rhs_batch or preferred_element_type is not None
      or tuple(lhs_contracting) != tuple(range(lhs.ndim - k, lhs.ndim))
      or tuple(rhs_contracting) != tuple(range(k))):
    raise ValueError(f"dense_dot_general contracts trailing lhs axes with leading rhs axes "
                     f"without batch axes; got {dimension_numbers}")
  return _dense_product(lhs, rhs, k, precision)


def _dense_dimensions(lhs_ndim: int, k: int):
  return ((tuple(range(lhs_ndim - k, lhs_ndim)), tuple(range(k))), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_product(lhs, rhs, k, precision):
  return lax.dot_general(lhs, rhs, _dense_dimensions(lhs.ndim, k), precision=precision)


def _dense_product_forward(lhs, rhs, k, precision):
  return _dense_product(lhs, rhs, k, precision), (lhs, rhs)


def _dense_product_backward(k, precision, residuals, grad):
  lhs, rhs = residuals
  # One contracted axis each: with several (the attention kernels' heads and
  # head width) XLA:CPU copies the kernel into a transposed layout at every
  # step instead of reading it as a transposed operand.
  kernel = rhs.reshape(int(np.prod(rhs.shape[:k])), -1)
  batch_shape = lhs.shape[:lhs.ndim - k]
  grad_features = grad.reshape(batch_shape + (kernel.shape[1],))
  grad_lhs = lax.dot_general(grad_features, kernel, (((len(batch_shape),), (1,)), ((), ())),
                             precision=precision)
  lhs_rows = lhs.reshape(-1, kernel.shape[0])
  grad_rows = grad_features.reshape(-1, kernel.shape[1])
  grad_rhs = lax.dot_general(lhs_rows, grad_rows, (((0,), (0,)), ((), ())), precision=precision)
  return (grad_lhs.reshape(lhs.shape).astype(lhs.dtype),
          grad_rhs.reshape(rhs.shape).astype(rhs.dtype))


_dense_product.defvjp(_dense_product_forward, _dense_product_backward)
