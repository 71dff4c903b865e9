"""torchvision's ResNet (bottleneck variants) with VPT's pad prompts (vpt.md 1.11).

ResNet-50 v1.5 (the stride sits on the 3x3 conv of a bottleneck), BatchNorm
always in inference mode. Its running mean and variance are parameters
(``.../bn1/mean``, ``.../bn1/var`` next to ``scale`` and ``bias``) behind
``jax.lax.stop_gradient`` and listed in ``always_frozen`` (``convnet_family``),
so no method, ``full`` included, ever changes them.

Parameter names mirror the PyTorch modules with "." turned into "_" where an
index follows a name: ``conv1``, ``bn1``, ``layer{s}_{i}/{conv,bn}{1,2,3}``,
``layer{s}_{i}/downsample_{conv,bn}``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt_jax.models.convnet_base import ConvNet

BATCH_NORM_EPSILON = 1e-5   # torchvision BatchNorm2d


class FrozenBatchNorm(nn.Module):
  """BatchNorm2d in inference mode, its running statistics stored as parameters.

  ``y = (x - mean) / sqrt(var + eps) * scale + bias`` over the last axis;
  ``mean`` and ``var`` get no gradient (and ``always_frozen`` keeps the
  optimizer off them), ``scale`` and ``bias`` train like any weight.
  """
  epsilon: float = BATCH_NORM_EPSILON

  @nn.compact
  def __call__(self, x):
    """x: (..., C) -> (..., C)."""
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    mean = jax.lax.stop_gradient(self.param("mean", nn.initializers.zeros, (channels,)))
    var = jax.lax.stop_gradient(self.param("var", nn.initializers.ones, (channels,)))
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x * multiplier.astype(x.dtype) + (bias - mean * multiplier).astype(x.dtype))


# torchvision's conv init (kaiming normal, fan-out); pretrained weights replace it.
_RESNET_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5): 1x1 -> 3x3 (stride) -> 1x1 (4x width), BN after each.

  A projection shortcut (1x1 conv with the stride, then BN) replaces the
  identity when the stride or the channel count changes.
  """
  width: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), 4 * width)."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_RESNET_CONV_INIT)
    out_channels = 4 * self.width
    y = conv(self.width, (1, 1), padding="VALID", name="conv1")(x)
    y = nn.relu(FrozenBatchNorm(name="bn1")(y))
    y = conv(self.width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)),
             name="conv2")(y)
    y = nn.relu(FrozenBatchNorm(name="bn2")(y))
    y = conv(out_channels, (1, 1), padding="VALID", name="conv3")(y)
    y = FrozenBatchNorm(name="bn3")(y)
    if self.stride != 1 or x.shape[-1] != out_channels:
      x = conv(out_channels, (1, 1), strides=self.stride, padding="VALID",
               name="downsample_conv")(x)
      x = FrozenBatchNorm(name="downsample_bn")(x)
    return nn.relu(x + y)


class ResNet(ConvNet):
  """torchvision ResNet (bottleneck variants) with optional pad prompts and the VPT head.

  Attributes as ``ConvNet``; variant "resnet-50" or "resnet-test". The
  features are the globally pooled last stage (B, 4 * widths[-1]), 2048 for
  ResNet-50. BatchNorm always uses its running statistics, in training too.
  """
  variant: str = "resnet-50"

  _FAMILY = "resnet"

  def features(self, x, size):
    x = nn.Conv(size.stem_width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, kernel_init=_RESNET_CONV_INIT, name="conv1")(x)
    x = nn.relu(FrozenBatchNorm(name="bn1")(x))
    # PyTorch's MaxPool2d pads with -inf, as reduce_window's init value does here.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (width, blocks) in enumerate(zip(size.widths, size.blocks), start=1):
      for index in range(blocks):
        stride = 2 if stage > 1 and index == 0 else 1
        x = Bottleneck(width, stride, dtype=self.dtype, name=f"layer{stage}_{index}")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


