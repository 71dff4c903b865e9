"""Classification heads, initialised as the VPT reference does."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

# Focal-loss style prior: every class starts at probability 0.01.
HEAD_BIAS_INIT = -math.log((1 - 0.01) / 0.01)


class LinearHead(nn.Module):
  """Dense(num_classes): kaiming-normal fan-out kernel (std sqrt(2/C)), bias -log(99).

  Maps features (B, D) to logits (B, num_classes).
  """
  num_classes: int

  @nn.compact
  def __call__(self, features):
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
    kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        (features.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.constant(HEAD_BIAS_INIT), (self.num_classes,))
    return jnp.dot(features, kernel) + bias
