"""VPT prompt tokens (Jia et al., "Visual Prompt Tuning", ECCV 2022).

Prompts are inserted after CLS and before the patch tokens and receive no
position embedding. Shallow VPT has one set (P, D); deep VPT has one set per
block, the first inserted after the embedding and each later one replacing the
previous block's prompt outputs.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


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


class VisualPrompts(nn.Module):
  """Learned prompt sets, projected, broadcast to the batch and dropped out.

  Parameters: ``shallow`` (P, d) and, for deep VPT, ``deep`` (S - 1, P, d),
  where d = ``projection`` if >= 1 (then a shared Dense(d -> width) named
  ``projection`` maps them, kaiming-normal fan-out as the reference) else width.
  Dropout is applied after broadcasting, so every example gets its own mask.
  """
  num_prompts: int
  num_sets: int
  width: int
  patch_size: int
  projection: int = -1
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, batch_size: int, *, train: bool):
    """Returns prompts of shape (num_sets, batch_size, num_prompts, width)."""
    if self.num_prompts < 1:
      raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
    prompt_dim = self.projection if self.projection >= 1 else self.width
    init = uniform_symmetric(prompt_init_bound(self.patch_size, prompt_dim))
    sets = [self.param("shallow", init, (self.num_prompts, prompt_dim))[None]]
    if self.num_sets > 1:
      sets.append(self.param("deep", init, (self.num_sets - 1, self.num_prompts, prompt_dim)))
    prompts = jnp.concatenate(sets, axis=0)
    if self.projection >= 1:
      prompts = nn.Dense(
          self.width, name="projection",
          kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
          bias_init=uniform_symmetric(1.0 / math.sqrt(prompt_dim)))(prompts)
    prompts = jnp.broadcast_to(prompts[:, None],
                               (self.num_sets, batch_size) + prompts.shape[1:])
    return nn.Dropout(self.dropout_rate)(prompts, deterministic=not train)
