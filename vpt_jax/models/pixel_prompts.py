"""VPT's pixel-space prompt locations for the ViT: pad, below and prepend-pixel.

As the reference's ``vit_ablations.py`` (KMnP/vpt) builds them, in NHWC:

* ``pad``: learned borders of p pixels around the (normalised) image,
  ``lr`` (H, 2p, 3) left/right and ``tb`` (2p, W + 2p, 3) top/bottom, drawn
  U(0, 1) and normalised with ImageNet's mean/std at use; the padded
  (H + 2p)-square image goes through the patch convolution, which (VALID,
  stride P) drops the last (H + 2p) mod P rows and columns, as torch's does.
  The position embedding covers the resulting (H + 2p) // P grid.
* ``below``: p extra input channels (H, W, p) drawn U(-v, v), concatenated to
  the image; the patch convolution gets p more input channels, drawn U(-v, v)
  (its pretrained 3 channels and bias load from the checkpoint). As
  conv([x, c]) = conv_x(x) + conv_c(c), the extra kernel is a separate
  parameter ``below_kernel`` (P, P, p, D) whose output is added to the patch
  tokens.
* ``prepend-pixel``: a (P, P * p, 3) pixel prompt passed through the frozen
  patch convolution (bias included) gives p tokens, inserted after CLS with no
  position embedding, projection or dropout. Init U(-v, v); "-gaussian"
  N(0, 1); "-imgnettransform" U(0, 1) then ImageNet-normalised.

v = sqrt(6 / (3 P^2 + D)), the reference's prompt bound (``prompts.prompt_init_bound``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt_jax.data import normalization as normalization_lib
from vpt_jax.models.prompts import prompt_init_bound, uniform_symmetric

PIXEL_LOCATIONS = ("pad", "below", "prepend-pixel", "prepend-pixel-gaussian",
                   "prepend-pixel-imgnettransform")


def imagenet_normalize(pixels):
  """torchvision's Normalize(ImageNet mean, std) over the last (channel) axis."""
  mean = jnp.asarray(normalization_lib.IMAGENET_MEAN, pixels.dtype)
  std = jnp.asarray(normalization_lib.IMAGENET_STD, pixels.dtype)
  return (pixels - mean) / std


def pad_images(images, lr, tb, num_prompts: int):
  """(B, H, W, 3) -> (B, H + 2p, W + 2p, 3): lr's first p columns left, the rest
  right, then tb's first p rows on top, the rest below (the reference's order)."""
  batch = images.shape[0]
  lr = jnp.broadcast_to(lr.astype(images.dtype), (batch,) + lr.shape)
  tb = jnp.broadcast_to(tb.astype(images.dtype), (batch,) + tb.shape)
  images = jnp.concatenate([lr[:, :, :num_prompts], images, lr[:, :, num_prompts:]], axis=2)
  return jnp.concatenate([tb[:, :num_prompts], images, tb[:, num_prompts:]], axis=1)


class PixelPrompts(nn.Module):
  """One pixel-space location; ``__call__`` is ``Hooks.embed_patches``.

  Parameters (under this module): ``pad_lr``/``pad_tb``, ``below``/``below_kernel``
  or ``pixels``. Returns (patch tokens (B, h, w, D), prompt tokens (p, D) or None).
  """
  location: str
  num_prompts: int
  width: int
  patch_size: int

  @nn.compact
  def __call__(self, images, embed):
    p, patch = self.num_prompts, self.patch_size
    bound = prompt_init_bound(patch, self.width)
    height, width = images.shape[1:3]
    if self.location == "pad":
      lr = self.param("pad_lr", nn.initializers.uniform(1.0), (height, 2 * p, 3))
      tb = self.param("pad_tb", nn.initializers.uniform(1.0), (2 * p, width + 2 * p, 3))
      return embed(pad_images(images, imagenet_normalize(lr), imagenet_normalize(tb), p)), None
    if self.location == "below":
      channels = self.param("below", uniform_symmetric(bound), (height, width, p))
      kernel = self.param("below_kernel", uniform_symmetric(bound),
                          (patch, patch, p, self.width))
      extra = jax.lax.conv_general_dilated(
          channels[None], kernel, (patch, patch), "VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      tokens = embed(images)
      return tokens + extra.astype(tokens.dtype), None
    if not self.location.startswith("prepend-pixel"):
      raise ValueError(f"Unknown pixel prompt location {self.location!r}; choose one of "
                       f"{PIXEL_LOCATIONS}")
    init = {"prepend-pixel": uniform_symmetric(bound),
            "prepend-pixel-gaussian": nn.initializers.normal(1.0),
            "prepend-pixel-imgnettransform": nn.initializers.uniform(1.0)}[self.location]
    pixels = self.param("pixels", init, (patch, patch * p, 3))
    if self.location == "prepend-pixel-imgnettransform":
      pixels = imagenet_normalize(pixels)
    prompts = embed(pixels[None])  # (1, 1, p, D)
    return embed(images), prompts.reshape(p, prompts.shape[-1]).astype(jnp.float32)
