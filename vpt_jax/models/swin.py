"""Swin Transformer backbones with VPT prompts: the ``swin`` family of ``backbones``.

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
``skip_dead_work`` has no further effect on Swin.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.models import backbones
from vpt_jax.models import heads as heads_lib
from vpt_jax.models import hooks as methods_lib
from vpt_jax.models import prompts as prompts_lib

LAYER_NORM_EPSILON = 1e-5  # PyTorch's nn.LayerNorm default, as the official Swin
MLP_RATIO = 4
# The official shifted-window mask value (not -inf): exp(-100) underflows in float32.
MASK_VALUE = -100.0
# The official Linear/table init is trunc_normal_(std=.02) with absolute bounds
# +-2, i.e. effectively an untruncated normal.
WEIGHT_INIT = nn.initializers.normal(stddev=0.02)
POOL_TYPES = ("original",)
SUPPORTED_METHODS = ("linear", "full", "partial-", "mlp-", "bias", "vpt_shallow", "vpt_deep",
                     "vpt+bias")


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
    raise ValueError(
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


def block_window(resolution: int, window: int, block_index: int) -> tuple[int, int]:
  """(window, shift) of block ``block_index`` on a resolution x resolution map.

  Odd blocks shift by window // 2; a map not larger than the window is one
  unshifted window (the official rule).
  """
  if resolution <= window:
    return resolution, 0
  return window, (window // 2 if block_index % 2 else 0)


def window_partition(x, window: int):
  """(B, H, W, C) -> (B, H/window * W/window, window^2, C); windows and their
  tokens in row-major order (numpy or jax arrays)."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window, window, width // window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(
      batch, (height // window) * (width // window), window * window, channels)


def window_reverse(windows, window: int, height: int, width: int):
  """Inverse of ``window_partition``: (B, nW, window^2, C) -> (B, H, W, C)."""
  batch, channels = windows.shape[0], windows.shape[-1]
  x = windows.reshape(batch, height // window, width // window, window, window, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def relative_position_index(window: int) -> np.ndarray:
  """(window^2, window^2) int: row of the bias table for each (query, key) pair.

  For tokens at (y_q, x_q) and (y_k, x_k): (y_q - y_k + window - 1) * (2 * window - 1)
  + (x_q - x_k + window - 1), the official indexing.
  """
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
  coords = coords.reshape(2, -1)
  relative = coords[:, :, None] - coords[:, None, :] + (window - 1)
  return relative[0] * (2 * window - 1) + relative[1]


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
  """(nW, window^2, window^2) float32: MASK_VALUE between tokens of different regions.

  After the cyclic shift by ``shift`` the last window row/column holds tokens
  from the opposite border; the map is cut into 3 x 3 regions
  ([0, -window), [-window, -shift), [-shift, end) per axis) and tokens attend
  only within their region.
  """
  regions = np.zeros((1, resolution, resolution, 1), np.float32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  label = 0
  for rows in bounds:
    for cols in bounds:
      regions[:, rows, cols, :] = label
      label += 1
  windows = window_partition(regions, window)[0, :, :, 0]  # (nW, window^2)
  different = windows[:, None, :] != windows[:, :, None]
  return np.where(different, MASK_VALUE, 0.0).astype(np.float32)


def spread_over_windows(per_image, num_windows: int, reference_order: bool = False):
  """(B, ...) -> (B, nW, ...): what window w of image b gets.

  Its own image's entry, or, in the reference's order, entry (b * nW + w) mod B:
  the reference copies the prompts window-major (row k = w * B + b') but lays
  the windows out image-major (row k = b * nW + w).
  """
  batch, rest = per_image.shape[0], per_image.shape[1:]
  if not reference_order:
    return jnp.broadcast_to(per_image[:, None], (batch, num_windows) + rest)
  window_major = jnp.broadcast_to(per_image[None], (num_windows, batch) + rest)
  return window_major.reshape((batch, num_windows) + rest)


def average_over_windows(per_window, reference_order: bool = False):
  """(B, nW, ...) -> (B, ...): the mean over each image's windows.

  In the reference's order (``view(-1, B, ...).mean(0)`` on image-major rows)
  image j gets the mean over rows k = b * nW + w with k mod B = j instead.
  """
  if not reference_order:
    return per_window.mean(axis=1)
  batch, num_windows = per_window.shape[:2]
  return per_window.reshape((num_windows, batch) + per_window.shape[2:]).mean(axis=0)


class RelativePositionBias(nn.Module):
  """The learned table ((2 * window - 1)^2, heads) as a (heads, window^2, window^2) bias."""
  num_heads: int
  window: int

  @nn.compact
  def __call__(self):
    table = self.param("bias", WEIGHT_INIT, ((2 * self.window - 1) ** 2, self.num_heads))
    tokens = self.window * self.window
    bias = table[relative_position_index(self.window).reshape(-1)]
    return bias.reshape(tokens, tokens, self.num_heads).transpose(2, 0, 1)


class WindowAttention(nn.Module):
  """Multi-head self-attention within windows, with prompts in front of each window.

  Each window attends over [its prompts, its window^2 tokens]; the relative
  position bias and the shift mask cover the window tokens only (zero for
  prompt rows and columns). Each window sees its image's prompts and the
  prompt outputs are averaged over the image's windows (or both in the
  reference's order, see ``spread_over_windows``).
  """
  num_heads: int
  window: int
  reference_window_order: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, windows, prompts=None, mask=None):
    """windows (B, nW, window^2, C), prompts (B, P, C) or None, mask (nW, window^2,
    window^2) or None -> (window outputs (B, nW, window^2, C), prompt outputs (B, P, C)
    or None)."""
    num_windows, channels = windows.shape[1], windows.shape[-1]
    if channels % self.num_heads:
      raise ValueError(f"width {channels} is not divisible by {self.num_heads} heads")
    head_dim = channels // self.num_heads
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, name=name,
                                            kernel_init=WEIGHT_INIT,
                                            bias_init=nn.initializers.zeros)
    qkv_projection = dense(3 * channels, "qkv")
    # The official channel order of the fused projection: (q|k|v, head, head_dim).
    split = lambda t: t.reshape(t.shape[:-1] + (3, self.num_heads, head_dim))
    qkv = split(qkv_projection(windows))  # (B, nW, N, 3, H, D)
    num_prompts = 0
    if prompts is not None:
      num_prompts = prompts.shape[1]
      # The prompts are the same tokens in every window: project them once per image.
      prompt_qkv = spread_over_windows(split(qkv_projection(prompts)), num_windows,
                                       self.reference_window_order)  # (B, nW, P, 3, H, D)
      qkv = jnp.concatenate([prompt_qkv, qkv], axis=2)
    query, key, value = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", query, key).astype(jnp.float32)
    padding = ((0, 0), (num_prompts, 0), (num_prompts, 0))
    bias = RelativePositionBias(self.num_heads, self.window, name="relative_position")()
    logits = logits + jnp.pad(bias.astype(jnp.float32), padding)
    if mask is not None:
      logits = logits + jnp.pad(jnp.asarray(mask, jnp.float32), padding)[:, None]
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    attended = jnp.einsum("bwhqk,bwkhd->bwqhd", weights, value)
    attended = attended.reshape(attended.shape[:3] + (channels,))
    output_projection = dense(channels, "proj")
    window_outputs = output_projection(attended[:, :, num_prompts:])
    if prompts is None:
      return window_outputs, None
    # proj is affine, so the mean of the projected outputs is the projected mean.
    averaged = average_over_windows(attended[:, :, :num_prompts], self.reference_window_order)
    return window_outputs, output_projection(averaged)


class Mlp(nn.Module):
  """Dense(ratio * C) -> exact GELU -> Dense(C): (..., C) -> (..., C)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, name=name,
                                            kernel_init=WEIGHT_INIT,
                                            bias_init=nn.initializers.zeros)
    hidden = nn.gelu(dense(MLP_RATIO * channels, "fc1")(x), approximate=False)
    return dense(channels, "fc2")(hidden)


def _layer_norm(name: str, dtype):
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


class SwinBlock(nn.Module):
  """One (shifted-)window block on [prompts, resolution^2 patches] tokens.

  x + DP(attention(norm1 x)), then x + DP(mlp(norm2 x)); DP is drop path
  (stochastic depth) at ``drop_path_rate``, one decision per example.
  """
  num_heads: int
  window: int
  shift: int
  num_prompts: int = 0
  drop_path_rate: float = 0.0
  reference_window_order: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, resolution: int, *, drop_path_deterministic: bool = True):
    """x (B, P + resolution^2, C) -> (B, P + resolution^2, C)."""
    batch, _, channels = x.shape
    num_prompts = self.num_prompts

    def drop_path(branch):
      return nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))(
          branch, deterministic=drop_path_deterministic)

    normed = _layer_norm("norm1", self.dtype)(x)
    image = normed[:, num_prompts:].reshape(batch, resolution, resolution, channels)
    if self.shift:
      image = jnp.roll(image, (-self.shift, -self.shift), axis=(1, 2))
    windows = window_partition(image, self.window)
    mask = (shifted_window_mask(resolution, self.window, self.shift) if self.shift
            else None)
    prompts = normed[:, :num_prompts] if num_prompts else None
    window_outputs, prompt_outputs = WindowAttention(
        self.num_heads, self.window, self.reference_window_order, dtype=self.dtype,
        name="attn")(windows, prompts, mask)
    image = window_reverse(window_outputs, self.window, resolution, resolution)
    if self.shift:
      image = jnp.roll(image, (self.shift, self.shift), axis=(1, 2))
    branch = image.reshape(batch, resolution * resolution, channels)
    if num_prompts:
      branch = jnp.concatenate([prompt_outputs.astype(branch.dtype), branch], axis=1)
    x = x + drop_path(branch)
    return x + drop_path(Mlp(self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x)))


class PatchMerging(nn.Module):
  """2x2 patch merging (C -> 2C) that carries the prompts (four copies, C -> 4C)."""
  num_prompts: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, resolution: int):
    """x (B, P + R^2, C) -> (B, P + (R/2)^2, 2C)."""
    batch, _, channels = x.shape
    image = x[:, self.num_prompts:].reshape(batch, resolution, resolution, channels)
    # The official order of the four neighbours along the channels.
    merged = jnp.concatenate([image[:, 0::2, 0::2], image[:, 1::2, 0::2],
                              image[:, 0::2, 1::2], image[:, 1::2, 1::2]], axis=-1)
    merged = merged.reshape(batch, (resolution // 2) ** 2, 4 * channels)
    if self.num_prompts:
      merged = jnp.concatenate([jnp.tile(x[:, :self.num_prompts], (1, 1, 4)), merged], axis=1)
    merged = _layer_norm("norm", self.dtype)(merged)
    return nn.Dense(2 * channels, use_bias=False, dtype=self.dtype, kernel_init=WEIGHT_INIT,
                    name="reduction")(merged)


class SwinStage(nn.Module):
  """The blocks of one stage and, unless last, the patch merging after them."""
  depth: int
  num_heads: int
  window: int
  num_prompts: int = 0
  drop_path_rates: tuple[float, ...] = ()
  downsample: bool = True
  reference_window_order: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, resolution: int, block_prompts: Optional[Sequence[Any]] = None, *,
               drop_path_deterministic: bool = True):
    """x (B, P + R^2, C) -> (B, P + (R/2)^2, 2C), or (B, P + R^2, C) for the last stage.

    ``block_prompts[i]`` (B, P, C), if given and not None, replaces the prompt
    tokens before block i (VPT-deep).
    """
    for i in range(self.depth):
      if block_prompts is not None and block_prompts[i] is not None:
        x = jnp.concatenate([block_prompts[i].astype(x.dtype), x[:, self.num_prompts:]], axis=1)
      window, shift = block_window(resolution, self.window, i)
      x = SwinBlock(self.num_heads, window, shift, self.num_prompts,
                    drop_path_rate=self.drop_path_rates[i] if self.drop_path_rates else 0.0,
                    reference_window_order=self.reference_window_order, dtype=self.dtype,
                    name=f"blocks_{i}")(
                        x, resolution, drop_path_deterministic=drop_path_deterministic)
    if self.downsample:
      x = PatchMerging(self.num_prompts, self.dtype, name="downsample")(x, resolution)
    return x


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
    return _layer_norm("norm", self.dtype)(tokens)


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
      raise ValueError(f"{self.variant} takes square images whose side is a multiple of "
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
          name=f"layers_{stage}")(
              x, resolution, None if block_prompts is None else block_prompts[stage],
              drop_path_deterministic=not (train and self.backbone_dropout))
      first_block += depth
      resolution //= 2
    x = _layer_norm("norm", self.dtype)(x)
    # The mean over every token, prompts included (the reference's avgpool).
    features = x.mean(axis=1).astype(jnp.float32)
    if return_features:
      return features
    return head(features, train=train)


# ---------------------------------------------------------------------------
# The family interface (backbones.Family).


def validate(spec: Mapping[str, Any], method: methods_lib.Method) -> None:
  """Swin checks: size, image size, pool, prompt projection."""
  unit = image_size_unit(spec["variant"])  # unknown variants fail here
  image_size = spec["image_size"]
  if image_size < unit or image_size % unit:
    suggestion = unit * max(1, round(image_size / unit))
    raise ValueError(
        f"image size {image_size} does not fit {spec['variant']}: it must be a multiple of "
        f"patch x window x 2^(stages - 1) = {unit}; use e.g. {suggestion}")
  if spec["pool"] not in POOL_TYPES:
    raise ValueError(f"pool {spec['pool']!r} is not defined for Swin, which averages all "
                     f"tokens as the reference; use pool='original'")
  if spec.get("prompt_projection", -1) >= 1:
    raise ValueError("prompt.projection is not supported for Swin (the reference defines "
                     "the projection but never applies it); use prompt.projection=-1")


def build(spec: Mapping[str, Any], num_classes: int,
          method: methods_lib.Method) -> SwinTransformer:
  """The ``SwinTransformer`` of a (validated) spec; ``dropout_rate`` is the drop-path rate."""
  return SwinTransformer(
      num_classes=num_classes,
      variant=spec["variant"],
      drop_path_rate=spec["dropout_rate"],
      backbone_dropout=method.backbone_dropout,
      num_prompts=spec["num_prompts"],
      deep_prompts=method.deep_prompts,
      prompt_dropout=spec["prompt_dropout"],
      dtype=backbones.DTYPES[spec["dtype"]],
      **backbones.head_settings(spec, method))


def block_patterns(variant: str) -> list[str]:
  """``layers_{s}/blocks_{i}`` for every block in forward order.

  A stage's patch merging counts with its last block, so partial-k matches the
  reference's Swin rules: partial-2 = the last stage, partial-4 = the last
  stage, the last two blocks of the stage before and that stage's downsample.
  """
  size, _, _ = decode_variant(variant)
  patterns = []
  for stage, depth in enumerate(size.depths):
    for i in range(depth):
      pattern = f"layers_{stage}/blocks_{i}"
      if i == depth - 1 and stage < len(size.depths) - 1:
        pattern += f"|layers_{stage}/downsample"
      patterns.append(pattern)
  return patterns


# Official per-block names -> ours, with "T" marking a Linear weight to transpose.
_BLOCK_NAMES = {
    "norm1.weight": "norm1/scale", "norm1.bias": "norm1/bias",
    "attn.qkv.weight": "attn/qkv/kernel:T", "attn.qkv.bias": "attn/qkv/bias",
    "attn.proj.weight": "attn/proj/kernel:T", "attn.proj.bias": "attn/proj/bias",
    "attn.relative_position_bias_table": "attn/relative_position/bias",
    "norm2.weight": "norm2/scale", "norm2.bias": "norm2/bias",
    "mlp.fc1.weight": "mlp/fc1/kernel:T", "mlp.fc1.bias": "mlp/fc1/bias",
    "mlp.fc2.weight": "mlp/fc2/kernel:T", "mlp.fc2.bias": "mlp/fc2/bias",
}
# Buffers the official file stores and this port recomputes; the classifier is replaced.
_IGNORED = re.compile(r"layers\.\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)"
                      r"|head\.(weight|bias)")


def torch_layout(variant: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Official state-dict key -> (our key with ":T"/":conv" transform tag, torch shape)."""
  size, patch, window = decode_variant(variant)
  c0 = size.embed_dim
  layout = {
      "patch_embed.proj.weight": ("patch_embed/proj/kernel:conv", (c0, 3, patch, patch)),
      "patch_embed.proj.bias": ("patch_embed/proj/bias", (c0,)),
      "patch_embed.norm.weight": ("patch_embed/norm/scale", (c0,)),
      "patch_embed.norm.bias": ("patch_embed/norm/bias", (c0,)),
  }
  for stage, (depth, heads, width) in enumerate(zip(size.depths, size.num_heads, size.widths)):
    shapes = {
        "norm1.weight": (width,), "norm1.bias": (width,),
        "attn.qkv.weight": (3 * width, width), "attn.qkv.bias": (3 * width,),
        "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
        "attn.relative_position_bias_table": ((2 * window - 1) ** 2, heads),
        "norm2.weight": (width,), "norm2.bias": (width,),
        "mlp.fc1.weight": (MLP_RATIO * width, width), "mlp.fc1.bias": (MLP_RATIO * width,),
        "mlp.fc2.weight": (width, MLP_RATIO * width), "mlp.fc2.bias": (width,),
    }
    for i in range(depth):
      for name, ours in _BLOCK_NAMES.items():
        layout[f"layers.{stage}.blocks.{i}.{name}"] = (f"layers_{stage}/blocks_{i}/{ours}",
                                                       shapes[name])
    if stage < len(size.depths) - 1:
      layout[f"layers.{stage}.downsample.reduction.weight"] = (
          f"layers_{stage}/downsample/reduction/kernel:T", (2 * width, 4 * width))
      layout[f"layers.{stage}.downsample.norm.weight"] = (
          f"layers_{stage}/downsample/norm/scale", (4 * width,))
      layout[f"layers.{stage}.downsample.norm.bias"] = (
          f"layers_{stage}/downsample/norm/bias", (4 * width,))
  last = size.widths[-1]
  layout["norm.weight"] = ("norm/scale", (last,))
  layout["norm.bias"] = ("norm/bias", (last,))
  return layout


def convert_torch(state_dict: Mapping[str, Any], variant: str) -> dict[str, np.ndarray]:
  """An official microsoft/Swin-Transformer state dict -> {our "/"-joined key: array}.

  Args:
    state_dict: {name: array} of e.g. ``swin_base_patch4_window7_224_22k.pth``'s
      "model" entry (a leading "model." on every key is accepted too).
    variant: the model's variant, e.g. "swin-B/4w7".

  Returns:
    Every backbone parameter; the conv kernel (O, I, H, W) becomes (H, W, I, O)
    and Linear weights (out, in) become (in, out). The classifier ``head.*`` and
    the buffers ``relative_position_index`` and ``attn_mask`` are dropped (the
    model recomputes the buffers).

  Raises:
    npz.CheckpointError: listing every unknown key, missing key and shape mismatch.
  """
  flat = dict(state_dict)
  if flat and all(key.startswith("model.") for key in flat):
    flat = {key[len("model."):]: value for key, value in flat.items()}
  layout = torch_layout(variant)
  unknown = sorted(key for key in flat if key not in layout and not _IGNORED.fullmatch(key))
  missing = sorted(key for key in layout if key not in flat)
  mismatched = sorted(f"{key}: file {tuple(np.shape(flat[key]))} vs {variant} {shape}"
                      for key, (_, shape) in layout.items()
                      if key in flat and tuple(np.shape(flat[key])) != shape)
  if unknown or missing or mismatched:
    lines = [f"the state dict does not match {variant}:"]
    for title, keys in (("unknown keys", unknown), ("missing keys", missing),
                        ("shape mismatches", mismatched)):
      if keys:
        lines += [f"  {title} ({len(keys)}):"] + [f"    {key}" for key in keys]
    if any(key.startswith("absolute_pos_embed") for key in unknown):
      lines.append("Hint: absolute position embeddings (ape=True) are not supported.")
    lines.append(f"Hint: check the variant against the checkpoint (sizes: "
                 f"{', '.join(NAMED_VARIANTS)}).")
    raise npz_lib.CheckpointError("\n".join(lines))
  converted = {}
  for key, (ours, _) in layout.items():
    value = np.asarray(flat[key])
    ours, _, transform = ours.partition(":")
    if transform == "conv":
      value = value.transpose(2, 3, 1, 0)
    elif transform == "T":
      value = value.T
    converted[ours] = np.ascontiguousarray(value)
  return converted


FAMILIES = {"swin": backbones.Family(
    name="swin", build=build, validate=validate, block_patterns=block_patterns,
    final_norm=r"norm/.*", convert_torch=convert_torch,
    supported_methods=SUPPORTED_METHODS)}
