"""The layers of a Swin stage with VPT prompts: window attention, MLP, block, patch merging.

The parameter names follow microsoft/Swin-Transformer (``attn/qkv``,
``attn/proj``, ``mlp/fc1``, ``downsample/reduction``, ...); how prompts travel
through them is described in ``swin``'s module docstring.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt_jax.models import attention_kernels
from vpt_jax.models import lean_ops
from vpt_jax.models.swin_windows import average_over_windows
from vpt_jax.models.swin_windows import block_window
from vpt_jax.models.swin_windows import relative_position_index
from vpt_jax.models.swin_windows import shifted_window_mask
from vpt_jax.models.swin_windows import spread_over_windows
from vpt_jax.models.swin_windows import window_partition
from vpt_jax.models.swin_windows import window_reverse

LAYER_NORM_EPSILON = 1e-5  # PyTorch's nn.LayerNorm default, as the official Swin
MLP_RATIO = 4
# The official Linear/table init is trunc_normal_(std=.02) with absolute bounds
# +-2, i.e. effectively an untruncated normal.
WEIGHT_INIT = nn.initializers.normal(stddev=0.02)


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
  reference's order, see ``spread_over_windows``). The bias and the additive
  shift mask reach ``attention_kernels.attend`` as one float32 logit bias.
  """
  num_heads: int
  window: int
  reference_window_order: bool = False
  dtype: jnp.dtype = jnp.float32
  attention_kernel: str = "einsum"  # attention_kernels.ATTENTION_KERNELS

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
                                            dot_general=lean_ops.dense_dot_general,
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
    padding = ((0, 0), (num_prompts, 0), (num_prompts, 0))
    bias = RelativePositionBias(self.num_heads, self.window, name="relative_position")()
    bias = jnp.pad(bias.astype(jnp.float32), padding)[None]  # (1, H, N, N), every window
    if mask is not None:  # (nW, 1, H, N, N): the window axis is mapped below
      bias = bias + jnp.pad(jnp.asarray(mask, jnp.float32), padding)[:, None, None]
    # The window axis becomes a vmapped batch axis: attend takes (B, T, N, H).
    attended = jax.vmap(
        lambda q, k, v, b: attention_kernels.attend(q, k, v, self.attention_kernel, b),
        in_axes=(1, 1, 1, None if mask is None else 0), out_axes=1)(query, key, value, bias)
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
                                            dot_general=lean_ops.dense_dot_general,
                                            kernel_init=WEIGHT_INIT,
                                            bias_init=nn.initializers.zeros)
    hidden = lean_ops.gelu(dense(MLP_RATIO * channels, "fc1")(x))
    return dense(channels, "fc2")(hidden)


def layer_norm(name: str, dtype) -> lean_ops.LayerNorm:
  """The official Swin LayerNorm (eps 1e-5) over the last axis."""
  return lean_ops.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


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
  attention_kernel: str = "einsum"

  @nn.compact
  def __call__(self, x, resolution: int, *, drop_path_deterministic: bool = True):
    """x (B, P + resolution^2, C) -> (B, P + resolution^2, C)."""
    batch, _, channels = x.shape
    num_prompts = self.num_prompts

    def drop_path(branch):
      return nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))(
          branch, deterministic=drop_path_deterministic)

    normed = layer_norm("norm1", self.dtype)(x)
    image = normed[:, num_prompts:].reshape(batch, resolution, resolution, channels)
    if self.shift:
      image = jnp.roll(image, (-self.shift, -self.shift), axis=(1, 2))
    windows = window_partition(image, self.window)
    mask = (shifted_window_mask(resolution, self.window, self.shift) if self.shift
            else None)
    prompts = normed[:, :num_prompts] if num_prompts else None
    window_outputs, prompt_outputs = WindowAttention(
        self.num_heads, self.window, self.reference_window_order, dtype=self.dtype,
        attention_kernel=self.attention_kernel, name="attn")(windows, prompts, mask)
    image = window_reverse(window_outputs, self.window, resolution, resolution)
    if self.shift:
      image = jnp.roll(image, (self.shift, self.shift), axis=(1, 2))
    branch = image.reshape(batch, resolution * resolution, channels)
    if num_prompts:
      branch = jnp.concatenate([prompt_outputs.astype(branch.dtype), branch], axis=1)
    x = x + drop_path(branch)
    return x + drop_path(Mlp(self.dtype, name="mlp")(layer_norm("norm2", self.dtype)(x)))


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
    merged = layer_norm("norm", self.dtype)(merged)
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
  attention_kernel: str = "einsum"

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
                    attention_kernel=self.attention_kernel, name=f"blocks_{i}")(
                        x, resolution, drop_path_deterministic=drop_path_deterministic)
    if self.downsample:
      x = PatchMerging(self.num_prompts, self.dtype, name="downsample")(x, resolution)
    return x

