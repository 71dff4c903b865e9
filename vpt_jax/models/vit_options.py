"""How a downloaded ViT tower differs from the plain ViT, as one frozen options object.

``TowerOptions()`` is the plain ViT (vision_transformer / timm); a family
module (``dinov2_family``, ``clip_family``, ``siglip_family``) builds
``vit.VisionTransformer`` with the options of its checkpoints:

* ``class_token`` / ``registers``: DINOv2's register tokens (``*_reg``) sit after
  CLS, after the position embedding (they have none); SigLIP has no CLS;
* ``patch_bias``: CLIP's ``conv1`` has no bias;
* ``ln_pre``: CLIP's LayerNorm after the position embedding, before the blocks;
* ``layer_norm_epsilon``: 1e-6 (ViT, DINOv2, SigLIP) or 1e-5 (CLIP: torch's default);
* ``ffn``: the MLP's activation ("gelu" exact, "gelu_tanh" as flax's and
  SigLIP's, "quick_gelu" x * sigmoid(1.702 x) of OpenAI CLIP) or "swiglu"
  (DINOv2 ViT-g: silu(x W1) * (x W2), then W3, with W1|W2 fused as ``w12``);
* ``layer_scale``: DINOv2's per-channel ``gamma`` on both residual branches;
* ``posemb_grid`` > 0: the position embedding is stored at that grid (the
  checkpoint's) and interpolated in every forward as DINOv2 does
  (``posemb_interpolation``); 0: stored at the image's grid (resampled once
  at load, ``checkpoints.merge``);
* ``pooling``: "cls" or "map" (SigLIP's attention-pooling head, ``map_head``),
  ``map_attends_prompts``: whether the MAP probe also reads prompt tokens;
* ``projection`` > 0: CLIP's ``proj`` (D, E) after the pooled, normalised CLS.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt_jax.models import lean_ops

FFN_KINDS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu")
POOLINGS = ("cls", "map")


@dataclasses.dataclass(frozen=True)
class TowerOptions:
  """Architecture options of a ViT tower; the defaults are the plain ViT."""
  class_token: bool = True
  registers: int = 0
  patch_bias: bool = True
  ln_pre: bool = False
  layer_norm_epsilon: float = 1e-6
  ffn: str = "gelu"
  layer_scale: bool = False
  posemb_grid: int = 0
  interpolate_offset: float = 0.0
  interpolate_antialias: bool = False
  pooling: str = "cls"
  map_attends_prompts: bool = True
  projection: int = 0

  @property
  def prefix_tokens(self) -> int:
    """Tokens before the prompts: CLS and registers ([CLS, registers, prompts, patches])."""
    return int(self.class_token) + self.registers


PLAIN = TowerOptions()


def activate(x, kind: str):
  """The FFN activation ``kind`` (FFN_KINDS minus swiglu) applied elementwise."""
  if kind == "gelu":
    return lean_ops.gelu(x)
  if kind == "gelu_tanh":
    return nn.gelu(x, approximate=True)
  if kind == "quick_gelu":
    return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)
  raise ValueError(f"Unknown activation {kind!r}; choose one of {FFN_KINDS[:3]}")


class SwiGLU(nn.Module):
  """DINOv2's SwiGLUFFNFused: ``w12`` (D -> 2h), silu(first half) * second half,
  ``w3`` (h -> D). ``hidden`` is h itself (DINOv2 rounds 2/3 of 4D up to a
  multiple of 8: 4096 for ViT-g). (B, N, D) -> (B, N, D)."""
  hidden: int
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool, block=None):
    del block  # the SwiGLU projections offer no hook points (see vit_blocks.MlpBlock)
    fused = nn.Dense(2 * self.hidden, dtype=self.dtype, name="w12",
                     dot_general=lean_ops.dense_dot_general)(x)
    gate, value = jnp.split(fused, 2, axis=-1)
    y = nn.Dropout(self.dropout_rate)(jax.nn.silu(gate) * value, deterministic=deterministic)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="w3",
                    dot_general=lean_ops.dense_dot_general)(y)


class LayerScale(nn.Module):
  """x * gamma, gamma (D,) per channel (DINOv2's hub models start it at 1.0)."""

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],))
    return x * gamma.astype(x.dtype)


def scaled(options: TowerOptions, branch, name: str):
  """The residual branch through LayerScale ``name`` when the tower has it."""
  return LayerScale(name=name)(branch) if options.layer_scale else branch


def check(options: TowerOptions) -> None:
  """ValueError on an option value no tower defines."""
  if options.ffn not in FFN_KINDS:
    raise ValueError(f"Unknown ffn {options.ffn!r}; choose one of {FFN_KINDS}")
  if options.pooling not in POOLINGS:
    raise ValueError(f"Unknown pooling {options.pooling!r}; choose one of {POOLINGS}")
  if options.pooling == "cls" and not options.class_token:
    raise ValueError("CLS pooling needs a class token; use pooling='map'")
