"""Multi-head attention pooling (MAP), SigLIP's pooling head (big_vision ``MAPHead``).

A learned probe (1, 1, D) attends over the encoder's tokens with its own
q/k/v/out projections; the result y gets a pre-LN MLP residual,
y + MLP(LN(y)), and is the pooled (B, D) feature. Parameter names follow
big_vision (``probe``, ``MultiHeadDotProductAttention_0/{query,key,value,out}``,
``LayerNorm_0``, ``MlpBlock_0/Dense_{0,1}``), so its ``.npz`` maps by name;
the MLP's activation is flax's default tanh GELU, as big_vision's (and
``gelu_pytorch_tanh`` in transformers' SigLIP). The head's attention takes no
method hooks: LoRA and the key-value prompts reach only the encoder's blocks.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vpt_jax.models import lean_ops
from vpt_jax.models import vit_blocks


class MAPHead(nn.Module):
  """(B, N, D) tokens -> (B, D) pooled features."""
  num_heads: int
  mlp_dim: int
  layer_norm_epsilon: float = 1e-6
  activation: str = "gelu_tanh"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    batch, _, width = tokens.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width))
    probe = jnp.broadcast_to(probe.astype(tokens.dtype), (batch, 1, width))
    pooled = vit_blocks.Attention(self.num_heads, dtype=self.dtype,
                                  name="MultiHeadDotProductAttention_0")(probe, tokens)
    normed = lean_ops.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                          name="LayerNorm_0")(pooled)
    pooled = pooled + vit_blocks.MlpBlock(self.mlp_dim, 0.0, dtype=self.dtype,
                                          activation=self.activation,
                                          name="MlpBlock_0")(normed, deterministic=True)
    return pooled[:, 0]
