"""Swin Transformer backbones with VPT prompts (``swin_family`` registers them).

Swin (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows", ICCV 2021) as microsoft/Swin-Transformer builds it:

* ``patch_embed``: a patch x patch convolution ``proj``, then LayerNorm
  ``norm`` (``patch_norm=True``); no absolute position embedding (``ape=False``);
* stages ``layers_{s}`` (width C * 2^s) of pre-LN blocks ``blocks_{i}``: window
  attention ``attn`` over non-overlapping window x window patches, with fused
  ``qkv`` (bias) and ``proj`` projections and a learned relative position bias
  per head; blocks with odd i cyclically shift the map by window // 2 first and
  mask (logit -100) pairs that were not neighbours before the shift; a stage
  whose map is not larger than the window attends over the whole map, unshifted;
  MLP ``mlp/fc1``, exact GELU, ``mlp/fc2`` (ratio 4); LayerNorm eps 1e-5;
* ``layers_{s}/downsample`` (patch merging, all stages but the last): each 2x2
  neighbourhood concatenated in the official channel order (row 0 col 0,
  row 1 col 0, row 0 col 1, row 1 col 1; C -> 4C), LayerNorm ``norm``,
  bias-free Dense ``reduction`` (4C -> 2C);
* the final ``norm`` over all tokens, then the mean of all tokens (8C for four
  stages), read by ``heads.Head`` (``head/``).

The relative position bias table (the official ``relative_position_bias_table``
of shape ((2 * window - 1)^2, heads)) is the parameter ``attn/relative_position/
bias``: it is a bias term, and the reference's Bias baseline trains every
parameter whose name contains "bias", this table included (vpt.md 1.5).

VPT (the reference's prompted Swin, KMnP/vpt ``vit_prompt/swin_transformer.py``,
vpt.md 1.7), P prompt tokens under ``vpt/`` kept in front of the image tokens:

* ``vpt/shallow`` (P, C) is prepended after the patch embedding (dropout after
  the broadcast to the batch: a mask per example);
* in every block, after ``norm1``, the same P prompts are put in front of every
  window's tokens; the relative position bias and the shift mask are padded
  with zeros for prompt rows and columns (prompts attend everywhere in their
  window and are never masked); the P prompt outputs of an image's windows are
  averaged; residual and MLP act on prompts and patches alike;
* patch merging carries the prompts: four copies side by side (C -> 4C), then
  the same LayerNorm and reduction as the patches;
* VPT-deep: ``vpt/deep_0`` (depths[0] - 1, P, C) and ``vpt/deep_{s}``
  (depths[s], P, C * 2^s) for s >= 1. Stage 0's first block reads the shallow
  prompts, its block i >= 1 replaces the prompt tokens with ``deep_0[i - 1]``;
  in stages s >= 1 every block i replaces them with ``deep_s[i]`` (so the
  merged prompts are discarded): one prompt set per block. Prompt dropout acts
  on each stage's whole ``deep_s`` tensor before the broadcast, so its mask is
  shared by the batch, as in the reference (vpt.md 8.8);
* every prompt entry starts U(-v, v), v = sqrt(6 / (3 * patch^2 + C)) with the
  stage-0 width C for every stage (0.1846 for Swin-B);
* the prompt outputs of the last stage are part of the pooled mean.

One deliberate difference: the reference lays a batch's windows out image by
image but its prompt copies window by window, so with more than one image per
batch a window meets the prompts of another image and the averaged prompt
outputs mix images (predictions depend on the batch's other images). Here each
image's windows see and average its own prompts, which equals the reference
exactly at batch size 1. ``reference_window_order=True`` reproduces the
reference's order for any batch size (parity checks only).

The prompt tokens' q/k/v are projected once per image rather than once per
window, and their outputs are averaged before ``proj`` (which is affine, so
the mean commutes with it): an exact rewrite of the reference's computation.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vpt_jax import errors
from vpt_jax.models import backbones
from vpt_jax.models import heads as heads_lib
from vpt_jax.models import prompts as prompts_lib
from vpt_jax.models.swin_blocks import SwinStage
from vpt_jax.models.swin_blocks import layer_norm


@dataclasses.dataclass(frozen=True)
class SwinSize:
  """Stage-0 width C, blocks per stage and heads per stage (widths C * 2^s)."""
  embed_dim: int
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]

  @property
  def widths(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2 ** s for s in range(len(self.depths)))


# The official sizes (microsoft/Swin-Transformer configs/swin/*.yaml) and tiny test sizes.
SWIN_SIZES = {
    "T": SwinSize(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "S": SwinSize(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "B": SwinSize(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "L": SwinSize(192, (2, 2, 18, 2), (6, 12, 24, 48)),
    "test": SwinSize(16, (2, 2), (2, 4)),
    "test3": SwinSize(8, (2, 2, 2), (1, 2, 4)),  # three stages: partial-4 crosses a merge
}
# The variants of released checkpoints (window 12 = the 384 px models).
NAMED_VARIANTS = ("swin-T/4w7", "swin-S/4w7", "swin-B/4w7", "swin-B/4w12", "swin-L/4w7",
                  "swin-L/4w12")
_VARIANT = re.compile(r"swin-([A-Za-z0-9]+)/(\d+)w(\d+)")


def decode_variant(variant: str) -> tuple[SwinSize, int, int]:
  """Parses "swin-B/4w7" into (SwinSize, patch size, window size).

  Raises:
    ValueError: naming the valid sizes and variants.
  """
  match = _VARIANT.fullmatch(variant)
  if (not match or match.group(1) not in SWIN_SIZES or int(match.group(2)) < 1
      or int(match.group(3)) < 1):
    raise errors.UserError(
        f"Unknown Swin variant {variant!r}. Use 'swin-<size>/<patch>w<window>' with size in "
        f"{sorted(SWIN_SIZES)}, e.g. {', '.join(NAMED_VARIANTS)}"
        + (backbones.did_you_mean(variant, NAMED_VARIANTS) or "."))
  return SWIN_SIZES[match.group(1)], int(match.group(2)), int(match.group(3))


def image_size_unit(variant: str) -> int:
  """The image sizes a variant accepts are multiples of patch * window * 2^(stages - 1).

  Every stage's map then splits into whole windows, and the last stage's map is
  at least one window wide.
  """
  size, patch, window = decode_variant(variant)
  return patch * window * 2 ** (len(size.depths) - 1)


class SwinPrompts(nn.Module):
  """The prompt sets of the reference's prompted Swin (see the module docstring).

  Parameters ``shallow`` (P, C_0) and, for VPT-deep, ``deep_0`` (depths[0] - 1,
  P, C_0) and ``deep_{s}`` (depths[s], P, C_s), all U(+-v) with
  v = sqrt(6 / (3 * patch^2 + C_0)).
  """
  num_prompts: int
  widths: tuple[int, ...]
  depths: tuple[int, ...]
  patch_size: int
  deep: bool = False
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, batch_size: int, *, train: bool):
    """-> (shallow prompts (B, P, C_0), per stage a list with, per block, None (keep
    the incoming prompt tokens) or the prompts (B, P, C_s) that replace them; None
    for VPT-shallow)."""
    if self.num_prompts < 1:
      raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
    init = prompts_lib.uniform_symmetric(
        prompts_lib.prompt_init_bound(self.patch_size, self.widths[0]))
    shallow = self.param("shallow", init, (self.num_prompts, self.widths[0]))
    shallow = prompts_lib.per_example_dropout(shallow[None], batch_size, self.dropout_rate,
                                              train)[0]
    if not self.deep:
      return shallow, None
    block_prompts = []
    for stage, (depth, width) in enumerate(zip(self.depths, self.widths)):
      first_deep = 1 if stage == 0 else 0  # stage 0's first block reads the shallow set
      stage_prompts = [None] * first_deep
      if depth > first_deep:
        sets = self.param(f"deep_{stage}", init, (depth - first_deep, self.num_prompts, width))
        # One mask for the whole stage tensor, shared by the batch (the reference's order).
        sets = nn.Dropout(self.dropout_rate)(sets, deterministic=not train)
        stage_prompts += [jnp.broadcast_to(s, (batch_size,) + s.shape) for s in sets]
      block_prompts.append(stage_prompts)
    return shallow, block_prompts


class PatchEmbedding(nn.Module):
  """Patch convolution ``proj`` and LayerNorm ``norm``: (B, H, W, 3) -> (B, H/p, W/p, C)."""
  embed_dim: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    tokens = nn.Conv(self.embed_dim, (self.patch_size, self.patch_size),
                     strides=(self.patch_size, self.patch_size), padding="VALID",
                     dtype=self.dtype, name="proj")(images)
    return layer_norm("norm", self.dtype)(tokens)


class SwinTransformer(nn.Module):
  """Swin classifier with optional VPT prompts (see the module docstring).

  Attributes:
    num_classes: classifier outputs.
    variant: "swin-<size>/<patch>w<window>", e.g. "swin-B/4w7".
    drop_path_rate: stochastic depth, ramped linearly over all blocks from 0 to
      this rate (the official rule); active only when ``backbone_dropout`` and
      training (full fine-tuning). The reference trains Swin-B end-to-end with 0.5.
    num_prompts, deep_prompts, prompt_dropout: VPT (0 prompts = none).
    head_hidden_layers, head_dropout, head_init: the head (``heads.Head``).
    reference_window_order: reproduce the reference's cross-image prompt order
      (see the module docstring); off by default.
    attention_kernel: "einsum" or "dot_product" (``attention_kernels``).
  """
  num_classes: int
  variant: str = "swin-B/4w7"
  drop_path_rate: float = 0.0
  backbone_dropout: bool = False
  num_prompts: int = 0
  deep_prompts: bool = False
  prompt_dropout: float = 0.0
  head_hidden_layers: int = 0
  head_dropout: float = 0.1
  head_init: str = "vpt"
  reference_window_order: bool = False
  dtype: jnp.dtype = jnp.float32
  attention_kernel: str = "einsum"

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_features: bool = False,
               from_features: bool = False):
    """images: (B, H, H, 3) normalised floats -> logits (B, num_classes).

    ``return_features``: the pooled features (B, C * 2^(stages - 1)) instead.
    ``from_features``: ``images`` are such features; only the head runs.
    """
    head = heads_lib.backbone_head(self)
    if from_features:
      return head(images, train=train)
    size, patch, window = decode_variant(self.variant)
    unit = image_size_unit(self.variant)
    if images.shape[1] != images.shape[2] or images.shape[1] % unit:
      raise errors.UserError(f"{self.variant} takes square images whose side is a multiple of "
                             f"{unit} (patch x window x 2^(stages - 1)); got {images.shape[1:3]}")
    tokens = PatchEmbedding(size.embed_dim, patch, self.dtype, name="patch_embed")(images)
    batch, resolution, _, channels = tokens.shape
    x = tokens.reshape(batch, resolution * resolution, channels)
    block_prompts = None
    if self.num_prompts:
      shallow, block_prompts = SwinPrompts(
          self.num_prompts, size.widths, size.depths, patch, deep=self.deep_prompts,
          dropout_rate=self.prompt_dropout, name="vpt")(batch, train=train)
      x = jnp.concatenate([shallow.astype(x.dtype), x], axis=1)
    rates = np.linspace(0.0, self.drop_path_rate, sum(size.depths)).tolist()
    first_block = 0
    num_stages = len(size.depths)
    for stage, (depth, heads) in enumerate(zip(size.depths, size.num_heads)):
      x = SwinStage(
          depth, heads, window, self.num_prompts,
          drop_path_rates=tuple(rates[first_block:first_block + depth]),
          downsample=stage < num_stages - 1,
          reference_window_order=self.reference_window_order, dtype=self.dtype,
          attention_kernel=self.attention_kernel, name=f"layers_{stage}")(
              x, resolution, None if block_prompts is None else block_prompts[stage],
              drop_path_deterministic=not (train and self.backbone_dropout))
      first_block += depth
      resolution //= 2
    x = layer_norm("norm", self.dtype)(x)
    # The mean over every token, prompts included (the reference's avgpool).
    features = x.mean(axis=1).astype(jnp.float32)
    if return_features:
      return features
    return head(features, train=train)
