"""The Vision Transformer's pre-LN block: attention, MLP and the block around them.

Parameter names are those of the google-research/vision_transformer checkpoints
(``LayerNorm_0``, ``MultiHeadDotProductAttention_0`` with ``query/key/value/out``,
``LayerNorm_1``, ``MlpBlock_0`` with ``Dense_0/Dense_1``), so a block of an
official checkpoint maps onto it by name. ``vit`` stacks these blocks into the
encoder; a method changes a block only through its hook points (``hooks``).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from vpt_jax.models import attention_kernels
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models import lean_ops
from vpt_jax.models import vit_options

LAYER_NORM_EPSILON = 1e-6


class MlpBlock(nn.Module):
  """Dense -> activation (exact GELU) -> dropout -> Dense -> dropout. (B, N, D) -> (B, N, D).

  Each Dense's output passes ``hooks.projection_output`` ("Dense_0", "Dense_1").
  """
  mlp_dim: int
  dropout_rate: float = 0.1
  hooks: hooks_lib.Hooks = hooks_lib.NO_HOOKS
  dtype: jnp.dtype = jnp.float32
  activation: str = "gelu"  # vit_options.FFN_KINDS but swiglu

  @nn.compact
  def __call__(self, x, *, deterministic: bool, block=None):
    width = x.shape[-1]

    def dense(inputs, features, name):
      outputs = nn.Dense(features, dtype=self.dtype, name=name,
                         dot_general=lean_ops.dense_dot_general,
                         kernel_init=nn.initializers.xavier_uniform(),
                         bias_init=nn.initializers.normal(stddev=1e-6))(inputs)
      return self.hooks.projection_output(name, inputs, outputs, (features,), 1, self.dtype,
                                          block)

    y = dense(x, self.mlp_dim, "Dense_0")
    y = vit_options.activate(y, self.activation)
    y = lean_ops.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(y, width, "Dense_1")
    return lean_ops.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Attention(nn.Module):
  """Multi-head dot-product attention with separate q/k/v/out projections.

  Parameter names and shapes equal flax's MultiHeadDotProductAttention
  (query/key/value kernels (D, H, D/H), out kernel (H, D/H, D)), so the
  official checkpoints load; queries and keys/values may come from different
  token sets, which the prompt methods use (CVPT calls the same instance, and
  hence the same parameters, for its cross-attention).

  Every projection's output passes ``hooks.projection_output`` (LoRA adds its update
  there, with its parameters under this module). ``extra_kv`` (B, N_kv, H, D/H)
  are already projected tokens prepended to the keys and to the values,
  K' = [E; K], V' = [E; V] (E2VPT's key-value prompts); the queries are unchanged.
  ``attention_kernel``: ``attention_kernels.ATTENTION_KERNELS`` (``model.attention``).
  """
  num_heads: int
  hooks: hooks_lib.Hooks = hooks_lib.NO_HOOKS
  dtype: jnp.dtype = jnp.float32
  attention_kernel: str = "einsum"

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, extra_kv=None, block=None):
    """(B, Nq, D) queries attend over (B, Nk, D) keys/values -> (B, Nq, D).

    ``block``: the calling block's ``hooks.BlockContext``, handed to
    ``projection_output``.
    """
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
    head_dim = width // self.num_heads

    def project(name, inputs, features, axis=-1):
      outputs = nn.DenseGeneral(features=features, axis=axis, dtype=self.dtype, name=name,
                                dot_general=lean_ops.dense_dot_general,
                                kernel_init=nn.initializers.xavier_uniform())(inputs)
      out_features = tuple(features) if isinstance(features, tuple) else (features,)
      num_in_axes = len(axis) if isinstance(axis, tuple) else 1
      return self.hooks.projection_output(name, inputs, outputs, out_features, num_in_axes,
                                          self.dtype, block)

    heads = (self.num_heads, head_dim)
    query = project("query", inputs_q, heads)
    key = project("key", inputs_kv, heads)
    value = project("value", inputs_kv, heads)
    if extra_kv is not None:
      extra_kv = extra_kv.astype(key.dtype)
      key = jnp.concatenate([extra_kv, key], axis=1)
      value = jnp.concatenate([extra_kv, value], axis=1)
    attended = attention_kernels.attend(query, key, value, self.attention_kernel)
    return project("out", attended, width, axis=(-2, -1))


class Encoder1DBlock(nn.Module):
  """Pre-LN Transformer block; a method changes it through ``hooks`` (``hooks.Hooks``).

    x = block_input(x)
    x += DP(attention_branch(SA(y))) [+ attention_parallel(y, x)]
                        y = attention_input(norm_output(LN0 x)); SA: Attention with extra_keys_values
    x = after_attention(x)
    x += DP(mlp_branch(MLP(z))) [+ mlp_parallel(z, x)]     z = mlp_input(norm_output(LN1 x))
    x = block_output(x)

  ``method_inputs`` is this block's slice of ``Hooks.block_inputs``.

  Two exact shortcuts avoid work whose result is thrown away:
  * ``kv_only``: tokens (B, P, D) that act only as keys and values (inserted
    after CLS, as VPT-deep prompts are) but whose own outputs are not needed,
    so they get no query, attention output, out-projection or MLP;
  * ``num_outputs``: only the first rows of ``x`` are computed (e.g. CLS in
    the last block of a CLS-pooled model); all rows still serve as keys.

  ``queries`` (B, T, D) are the opposite of ``kv_only``: rows that go through
  the whole block (norms, attention as queries, MLP, residuals) but are no
  keys or values, so the other rows do not see them (VQT's query tokens).

  DP is drop path (stochastic depth) at ``drop_path_rate``: per example, the
  branch is zeroed with that probability and otherwise scaled by 1 / (1 - rate).

  ``options`` (``vit_options.TowerOptions``): the LayerNorm epsilon, the FFN
  (activation or SwiGLU) and LayerScale, which scales SA's and the FFN's
  output (``ls1``, ``ls2``) before the branch hooks see them.

  Every argument may also be passed positionally: ``nn.remat`` holds only
  positional arguments static (``BLOCK_STATIC_ARGNUMS``), so ``Encoder`` calls
  each block that way.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  drop_path_rate: float = 0.0
  hooks: hooks_lib.Hooks = hooks_lib.NO_HOOKS
  dtype: jnp.dtype = jnp.float32
  options: vit_options.TowerOptions = vit_options.PLAIN
  attention_kernel: str = "einsum"

  @nn.compact
  def __call__(self, x, kv_only=None, num_outputs: Optional[int] = None,
               deterministic: bool = True, method_inputs=None,
               drop_path_deterministic: bool = True, queries=None):
    """x: (B, N, D) -> (B, N or num_outputs, D); with ``queries`` (B, T, D) their
    outputs come first: (B, T + (N or num_outputs), D)."""
    hooks = self.hooks
    attention = Attention(self.num_heads, hooks=hooks, dtype=self.dtype,
                          attention_kernel=self.attention_kernel,
                          name="MultiHeadDotProductAttention_0")
    context = hooks_lib.BlockContext(attention, method_inputs, self.dtype,
                                     train=not drop_path_deterministic,
                                     drop_path=self.drop_path_rate)

    def drop_path(branch):
      # Broadcast over tokens and channels: one keep/drop decision per example.
      return nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))(
          branch, deterministic=drop_path_deterministic)

    num_queries = 0 if queries is None else queries.shape[1]
    if queries is not None:  # query-only rows in front: every later step is per row
      x = jnp.concatenate([queries.astype(x.dtype), x], axis=1)
    x = hooks.block_input(x, context)
    options = self.options
    pre_attention_norm = lean_ops.LayerNorm(epsilon=options.layer_norm_epsilon, dtype=self.dtype,
                                      name="LayerNorm_0")

    def attention_rows(rows):
      # Called a second time for kv_only rows: a hook that creates modules here
      # cannot serve a method with deep prompts (no method combines the two).
      normed_rows = hooks.norm_output("LayerNorm_0", pre_attention_norm(rows))
      return hooks.attention_input(normed_rows, context)

    normed = attention_rows(x)
    keys_values = normed[:, num_queries:]  # VQT's query rows are no keys or values
    if kv_only is not None:
      keys_values = jnp.concatenate(
          [keys_values[:, :1], attention_rows(kv_only), keys_values[:, 1:]], axis=1)
    if num_outputs is not None:
      x, normed = x[:, :num_queries + num_outputs], normed[:, :num_queries + num_outputs]
    branch = attention(normed, keys_values, hooks.extra_keys_values(context), context)
    branch = vit_options.scaled(options, branch, "ls1")
    beside = hooks.attention_parallel(normed, x, context)
    x = x + drop_path(hooks.attention_branch(branch, x, context))
    x = x if beside is None else x + beside
    x = hooks.after_attention(x, context)
    normed = lean_ops.LayerNorm(
        epsilon=options.layer_norm_epsilon, dtype=self.dtype, name="LayerNorm_1")(x)
    normed = hooks.mlp_input(hooks.norm_output("LayerNorm_1", normed), x, context)
    ffn = (vit_options.SwiGLU(self.mlp_dim, self.dropout_rate, self.dtype, name="MlpBlock_0")
           if options.ffn == "swiglu" else
           MlpBlock(self.mlp_dim, self.dropout_rate, hooks=hooks, dtype=self.dtype,
                    activation=options.ffn, name="MlpBlock_0"))
    branch = vit_options.scaled(
        options, ffn(normed, deterministic=deterministic, block=context), "ls2")
    beside = hooks.mlp_parallel(normed, x, context)
    x = x + drop_path(hooks.mlp_branch(branch, context))
    x = x if beside is None else x + beside
    return hooks.block_output(x, context)
