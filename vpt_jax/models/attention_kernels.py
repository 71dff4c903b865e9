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
  shapes and dtypes it does not support instead of falling back.

Both compute softmax(q k^T / sqrt(head_dim) + bias) v with a float32 softmax and
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

ATTENTION_KERNELS = ("einsum", "dot_product")


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
      (4-D); it is added in float32 on both paths (Swin's relative position
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
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = lean_ops.softmax(logits, -1).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)
