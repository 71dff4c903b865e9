"""The official ConvNeXt (facebookresearch/ConvNeXt) with VPT's pad prompts (vpt.md 1.11).

VPT uses ConvNeXt-B pretrained on ImageNet-22k: depthwise 7x7 conv, LayerNorm
(eps 1e-6), 4x MLP with exact GELU, layer scale ``gamma``, final LayerNorm on
the globally average-pooled map.

Parameter names mirror the PyTorch modules with "." turned into "_" where an
index follows a name: ``downsample_{i}/{conv,norm}``,
``stage{s}_{i}/{dwconv,norm,pwconv1,pwconv2,gamma}``, ``norm``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vpt_jax.models import lean_ops
from vpt_jax.models.convnet_base import ConvNet

LAYER_NORM_EPSILON = 1e-6   # every ConvNeXt LayerNorm
LAYER_SCALE_INIT = 1e-6     # ConvNeXt's gamma


def _layer_norm(name: str, dtype):
  # Two-pass variance, as PyTorch computes it.
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, use_fast_variance=False, dtype=dtype,
                      name=name)


_CONVNEXT_INIT = nn.initializers.truncated_normal(stddev=0.02)


class ConvNeXtBlock(nn.Module):
  """x + gamma * Dense(GELU(Dense(LayerNorm(DepthwiseConv7x7(x))))), widths d -> 4d -> d."""
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, dim) -> (B, H, W, dim)."""
    y = nn.Conv(self.dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=self.dim,
                dtype=self.dtype, kernel_init=_CONVNEXT_INIT, name="dwconv")(x)
    y = _layer_norm("norm", self.dtype)(y)
    y = nn.Dense(4 * self.dim, dtype=self.dtype, kernel_init=_CONVNEXT_INIT, name="pwconv1")(y)
    y = lean_ops.gelu(y)  # torch.nn.GELU() is the exact erf form
    y = nn.Dense(self.dim, dtype=self.dtype, kernel_init=_CONVNEXT_INIT, name="pwconv2")(y)
    gamma = self.param("gamma", nn.initializers.constant(LAYER_SCALE_INIT), (self.dim,))
    return x + gamma.astype(y.dtype) * y


class ConvNeXtDownsample(nn.Module):
  """The stem (4x4 stride-4 conv, then LayerNorm) or a later downsampling layer
  (LayerNorm, then a 2x2 stride-2 conv); names ``conv`` and ``norm`` either way."""
  dim: int
  stem: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, C) -> (B, H // k, W // k, dim), k = 4 (stem) or 2."""
    patch = 4 if self.stem else 2
    conv = nn.Conv(self.dim, (patch, patch), strides=patch, padding="VALID", dtype=self.dtype,
                   kernel_init=_CONVNEXT_INIT, name="conv")
    norm = _layer_norm("norm", self.dtype)
    return norm(conv(x)) if self.stem else conv(norm(x))


class ConvNeXt(ConvNet):
  """The official ConvNeXt with optional pad prompts and the VPT head.

  Attributes as ``ConvNet``; variant "convnext-B" or "convnext-test". The
  features are the final LayerNorm of the globally pooled last stage
  (B, dims[-1]), 1024 for ConvNeXt-B. No stochastic depth: the reference
  builds ConvNeXt-B with drop_path_rate 0.
  """
  variant: str = "convnext-B"

  _FAMILY = "convnext"

  def features(self, x, size):
    for stage, (dim, depth) in enumerate(zip(size.dims, size.depths)):
      x = ConvNeXtDownsample(dim, stem=stage == 0, dtype=self.dtype,
                             name=f"downsample_{stage}")(x)
      for index in range(depth):
        x = ConvNeXtBlock(dim, dtype=self.dtype, name=f"stage{stage}_{index}")(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return _layer_norm("norm", jnp.float32)(pooled)
