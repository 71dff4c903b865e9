"""What the ConvNet backbones (``resnet``, ``convnext``) share: sizes, pad prompts, the base.

VPT for ConvNets (the reference's ``LOCATION="pad"``): the normalised image is
framed by ``p`` learned pixels on every side and the frozen network sees
(S + 2p) x (S + 2p) pixels, 234 x 234 for the paper's 224 px crops and p = 5.
The image is not resized; sizes that are not a multiple of the network's
stride lose their last rows/columns in the strided convolutions exactly as in
PyTorch (explicit symmetric padding everywhere). VPT-deep has no ConvNet
counterpart and is refused (``convnet_family``).

``ConvNet`` puts the pad prompts in front of a subclass's ``features`` and the
VPT head after them; the variants of both families are decoded here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vpt_jax import errors
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.models import backbones
from vpt_jax.models import heads as heads_lib

# The reference normalises its pad prompts (drawn in [0, 1] pixel units) with
# torchvision's ImageNet Normalize whatever the data pipeline does.
PROMPT_MEAN, PROMPT_STD = normalization_lib.IMAGENET_MEAN, normalization_lib.IMAGENET_STD


# ----------------------------------------------------------------------------
# Sizes and variants.


@dataclasses.dataclass(frozen=True)
class ResNetSize:
  """Stem width, bottleneck widths per stage (outputs are 4x) and blocks per stage."""
  stem_width: int
  widths: tuple[int, ...]
  blocks: tuple[int, ...]

  @property
  def stride(self) -> int:
    """Input pixels per feature-map pixel: stem conv and max-pool, then 2 per later stage."""
    return 4 * 2 ** (len(self.widths) - 1)

  @property
  def feature_dim(self) -> int:
    return 4 * self.widths[-1]


@dataclasses.dataclass(frozen=True)
class ConvNeXtSize:
  """Channels and blocks per stage."""
  dims: tuple[int, ...]
  depths: tuple[int, ...]

  @property
  def stride(self) -> int:
    """Input pixels per feature-map pixel: the 4x4 stem, then 2 per later stage."""
    return 4 * 2 ** (len(self.dims) - 1)

  @property
  def feature_dim(self) -> int:
    return self.dims[-1]


RESNET_SIZES = {
    "50": ResNetSize(stem_width=64, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3)),
    # Tests: two stages, a projection shortcut in both first blocks.
    "test": ResNetSize(stem_width=8, widths=(4, 8), blocks=(1, 2)),
}
CONVNEXT_SIZES = {
    "B": ConvNeXtSize(dims=(128, 256, 512, 1024), depths=(3, 3, 27, 3)),
    "test": ConvNeXtSize(dims=(8, 16), depths=(1, 2)),
}
_SIZES = {"resnet": RESNET_SIZES, "convnext": CONVNEXT_SIZES}


def decode_variant(variant: str) -> tuple[str, Any]:
  """"resnet-50" -> ("resnet", ResNetSize), "convnext-B" -> ("convnext", ConvNeXtSize).

  Raises:
    ValueError: unknown variant; the message lists the valid ones.
  """
  family, _, size = variant.partition("-")
  sizes = _SIZES.get(family, {})
  if size in sizes:
    return family, sizes[size]
  valid = [f"{name}-{size}" for name, table in _SIZES.items() for size in table]
  raise errors.UserError(f"Unknown ConvNet variant {variant!r}; choose one of {', '.join(valid)}"
                         + backbones.did_you_mean(variant, valid, n=2))


# ----------------------------------------------------------------------------
# Modules.


class PadPrompts(nn.Module):
  """VPT's prompts for ConvNets: a frame of ``num_prompts`` (p) learned pixels.

  Parameters (pixel values, drawn U(0, 1) and normalised with ImageNet's
  mean/std at use, as the reference's ``INITIATION="random"``):
  ``top_bottom`` (2p, W + 2p, 3): rows [:p] go above the image, rows [p:]
  below; ``left_right`` (H, 2p, 3): columns [:p] go left of the image,
  columns [p:] right. (The reference's (1, 3, 2p, S + 2p) and (1, 3, S, 2p)
  tensors in NHWC.) The left/right strips span the image rows, the top/bottom
  strips the full padded width. No dropout: the reference has none.
  """
  num_prompts: int

  @nn.compact
  def __call__(self, images):
    """images: (B, H, W, 3) normalised -> (B, H + 2p, W + 2p, 3)."""
    p = self.num_prompts
    batch, height, width, channels = images.shape
    if p < 1 or channels != 3:
      raise errors.UserError(f"pad prompts need num_prompts >= 1 and RGB images; got "
                             f"num_prompts={p} and images of shape {images.shape}")
    uniform = nn.initializers.uniform(scale=1.0)  # U(0, 1)
    top_bottom = self.param("top_bottom", uniform, (2 * p, width + 2 * p, 3))
    left_right = self.param("left_right", uniform, (height, 2 * p, 3))
    mean, std = jnp.asarray(PROMPT_MEAN), jnp.asarray(PROMPT_STD)
    top_bottom = ((top_bottom - mean) / std).astype(images.dtype)
    left_right = ((left_right - mean) / std).astype(images.dtype)

    def batched(strip):
      return jnp.broadcast_to(strip, (batch,) + strip.shape)
    framed = jnp.concatenate(
        [batched(left_right[:, :p]), images, batched(left_right[:, p:])], axis=2)
    return jnp.concatenate(
        [batched(top_bottom[:p]), framed, batched(top_bottom[p:])], axis=1)


class ConvNet(nn.Module):
  """What ``ResNet`` and ``ConvNeXt`` share: pad prompts in front, the head after.

  Attributes:
    num_classes: classifier outputs.
    variant: a variant of the subclass's family (``decode_variant``).
    num_prompts: p of the pad prompts (0 = none).
    head_hidden_layers, head_dropout, head_init: the head (``heads.Head``).
    dtype: computation dtype of the convolutions.
  """
  num_classes: int
  variant: str
  num_prompts: int = 0
  head_hidden_layers: int = 0
  head_dropout: float = 0.1
  head_init: str = "vpt"
  dtype: Any = jnp.float32

  _FAMILY = ""  # the family of the subclass's variants

  def features(self, x, size):
    """The backbone on (padded) images in ``dtype`` -> pooled features (B, F) float32."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_features: bool = False,
               from_features: bool = False):
    """images: (B, H, W, 3) normalised floats -> logits (B, num_classes).

    ``return_features``: the pooled features the head reads (see the
    subclass). ``from_features``: ``images`` are such features; only the head
    runs. ``train`` only reaches the head.
    """
    head = heads_lib.backbone_head(self)
    if from_features:
      return head(images, train=train)
    family, size = decode_variant(self.variant)
    if family != self._FAMILY:
      raise ValueError(f"{type(self).__name__} got the {family} variant {self.variant!r}")
    x = images
    if self.num_prompts:
      x = PadPrompts(self.num_prompts, name="vpt")(x)
    features = self.features(x.astype(self.dtype), size)
    if return_features:
      return features
    return head(features, train=train)

