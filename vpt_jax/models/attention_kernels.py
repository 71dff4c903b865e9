"""The attention kernel every backbone calls: ``attend(query, key, value, kernel, bias)``.

``model.attention`` picks it:

* ``"einsum"`` (default): two einsums around a float32 softmax, the query scaled
  in its own dtype before the first einsum (the path the equivalence and
  precision tests were written against);
* ``"dot_product"``: ``jax.nn.dot_product_attention`` with
  ``implementation=None``, so JAX chooses the kernel. In jax 0.10.2 ``None``
  still means its XLA composition (which computes the logits with a float32
  accumulator and output, scales them in float32, adds the bias in float32 and
  takes the softmax in float32); cuDNN's fused kernel needs
  ``implementation="cudnn"`` there, which we do not force because it refuses
  shapes and dtypes it does not support instead of falling back;
* ``"recompute"``: the ``einsum`` forward, operation for operation, whose
  backward pass recomputes the attention weights from q, k and the bias instead
  of keeping them. It saves B x N x T x S float32 values per attention layer
  (2.1 GiB over ViT-B/16's twelve blocks at batch 64 with 50 prompts, 30% of
  what a frozen backbone's backward pass keeps) for one more q k^T product and
  softmax per layer.

All three compute softmax(q k^T / sqrt(head_dim) + bias) v with a float32 softmax and
the weights cast back to the value dtype. In float32 they differ only by
rounding (the scale is applied to q or to the logits); in bfloat16 the einsum
path rounds the logits to bfloat16 before the softmax, the ``dot_product``
path does not (``tests/tolerances.BF16_ATTENTION_LOGITS``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from vpt_jax import errors
from vpt_jax.models import lean_ops

ATTENTION_KERNELS = ("einsum", "dot_product", "recompute")


def forward_kernel(kernel: str) -> str:
  """The kernel whose forward pass ``kernel`` runs, operation for operation:
  ``recompute`` differs from ``einsum`` only in its backward pass."""
  return "einsum" if kernel == "recompute" else kernel


def check_kernel(kernel: str) -> None:
  """One-line ``UserError`` for an unknown ``model.attention``."""
  if kernel not in ATTENTION_KERNELS:
    raise errors.UserError(f"Unknown model.attention {kernel!r}; choose one of "
                           f"{ATTENTION_KERNELS} (e.g. --config.model.attention=einsum)")


def attend(query: jax.Array, key: jax.Array, value: jax.Array, kernel: str = "einsum",
           bias: Optional[jax.Array] = None) -> jax.Array:
  """Multi-head attention in the BTNH layout.

  Args:
    query: (B, T, N, H) unscaled queries (T query tokens, N heads of H channels).
    key, value: (B, S, N, H), same dtype as ``query``.
    kernel: one of ``ATTENTION_KERNELS``.
    bias: None or an additive logit bias broadcastable to (B, N, T, S)
      (4-D); it is added in float32 on every path (Swin's relative position
      bias and shift mask).

  Returns:
    (B, T, N, H) in the dtype of ``value``.
  """
  check_kernel(kernel)
  head_dim = query.shape[-1]
  if kernel == "dot_product":
    bias = None if bias is None else bias.astype(jnp.float32)
    return jax.nn.dot_product_attention(query, key, value, bias, scale=head_dim ** -0.5,
                                        implementation=None)
  query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
  if kernel == "recompute":
    return _recomputed_attention(query, key, value, bias)
  return _einsum_attention(query, key, value, bias)


def _einsum_attention(query, key, value, bias):
  """(B, T, N, H) attention of scaled queries (B, T, N, H), keys and values (B, S, N, H)."""
  weights = lean_ops.softmax(_logits(query, key, bias), -1).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _logits(query, key, bias):
  """float32 (B, N, T, S) logits of scaled queries (B, T, N, H) and keys (B, S, N, H)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return logits


@jax.custom_vjp
def _recomputed_attention(query, key, value, bias):
  """The einsum kernel after the query scaling; the backward keeps q, k, v, bias."""
  return _einsum_attention(query, key, value, bias)


def _recomputed_forward(query, key, value, bias):
  return _recomputed_attention(query, key, value, bias), (query, key, value, bias)


def _recomputed_backward(residuals, grad):
  query, key, value, bias = residuals
  # XLA:CPU removes optimization barriers before it eliminates common
  # subexpressions, so recomputing from q itself would hand back the forward
  # pass's weights, kept alive until here. q + 0 * (one element of the incoming
  # gradient) is q, bit for bit (the gradient is finite wherever it matters),
  # but a new expression that also waits for the gradient: XLA can neither
  # share it with the forward pass nor recompute every layer's weights early.
  zero = jnp.zeros((), query.dtype) * grad.reshape(-1)[0].astype(query.dtype)
  weights = jax.nn.softmax(_logits(query + zero, key, bias), -1)
  grad_value = jnp.einsum("bhqk,bqhd->bkhd", weights.astype(value.dtype), grad)
  grad_weights = jnp.einsum("bqhd,bkhd->bhqk", grad, value).astype(jnp.float32)
  grad_logits = lean_ops.softmax_backward(weights, grad_weights)
  grad_bias = None if bias is None else _sum_to_shape(grad_logits, bias.shape).astype(bias.dtype)
  grad_logits = grad_logits.astype(query.dtype)  # the q k^T product ran in this dtype
  grad_query = jnp.einsum("bhqk,bkhd->bqhd", grad_logits, key)
  grad_key = jnp.einsum("bhqk,bqhd->bkhd", grad_logits, query)
  return grad_query, grad_key, grad_value, grad_bias


_recomputed_attention.defvjp(_recomputed_forward, _recomputed_backward)


def _sum_to_shape(x: jax.Array, shape) -> jax.Array:
  """Sums a (B, N, T, S) gradient over the axes a 4-D ``shape`` broadcasts."""
  axes = tuple(i for i, (size, full) in enumerate(zip(shape, x.shape)) if size == 1 != full)
  return jnp.sum(x, axis=axes, keepdims=True)
