"""Building blocks of prompts that backbones and prompt methods share.

The reference's prompt initialisation (a Xavier-uniform bound from the patch
convolution's fan-in), a symmetric uniform initializer and the per-example
prompt dropout. The prompt methods themselves (VPT, VFPT, CVPT, E2VPT) live in
``vpt_jax.methods``; Swin's own prompts use these blocks directly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vpt_jax.models import lean_ops


def prompt_init_bound(patch_size: int, prompt_dim: int) -> float:
  """The reference's Xavier-uniform bound from the patch conv fan-in.

  sqrt(6 / (3 * patch^2 + prompt_dim)); 0.0625 for ViT-B/16.
  """
  return math.sqrt(6.0 / (3 * patch_size * patch_size + prompt_dim))


def uniform_symmetric(bound: float):
  """Initializer drawing U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
  return init


def per_example_dropout(prompts, batch_size: int, rate: float, train: bool):
  """(S, ...) prompt sets -> (S, batch_size, ...), dropped out while training.

  The broadcast comes first, so every example gets its own mask (inverted
  dropout, scale 1 / (1 - rate)), as the references do. Call from a compact
  method: the Dropout module joins the calling module.
  """
  prompts = jnp.broadcast_to(prompts[:, None],
                             (prompts.shape[0], batch_size) + prompts.shape[1:])
  return lean_ops.Dropout(rate)(prompts, deterministic=not train)
