"""CLIP image towers (openai/CLIP, mlfoundations/open_clip): "clip-B/32", "clip-B/16",
"clip-L/14"; "-gelu" for open_clip models trained with exact GELU ("clip-B/16-gelu").

openai/CLIP ``model.VisionTransformer``: a bias-free patch convolution
``conv1``, ``class_embedding`` (D,) and ``positional_embedding`` (1 + N, D)
(CLS row first), ``ln_pre`` before the blocks, pre-LN residual blocks (torch
LayerNorm eps 1e-5; ``nn.MultiheadAttention`` with a fused ``in_proj``; MLP
``c_fc`` -> QuickGELU x * sigmoid(1.702 x) -> ``c_proj``), then the features
ln_post(CLS) @ ``proj`` (D, E). OpenAI's weights and open_clip's
``*-quickgelu`` models use QuickGELU; open_clip's LAION/DataComp ViT-B-16 etc.
use exact GELU (its ``QuickGELU`` is opt-in): pick "-gelu" for those. Prompts go
after CLS (VPT's placement); the head reads the projected (E) features.

Checkpoints: state dicts holding ``visual.*`` (OpenAI's weights as open_clip
saves them, ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors`` on
the hub); the text tower and ``logit_scale`` are not read. TorchScript
archives (OpenAI's ``ViT-B-32.pt``) are refused by the reader: use open_clip's
state-dict files.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vpt_jax.models import tower_family
from vpt_jax.models import torch_vit_layout
from vpt_jax.models import vit_options
from vpt_jax.models import vit_variants

NAMED_VARIANTS = ("clip-B/32", "clip-B/16", "clip-L/14", "clip-B/32-gelu", "clip-B/16-gelu",
                  "clip-L/14-gelu", "clip-H/14-gelu")
# The joint embedding's width (``proj``'s columns) per tower size.
EMBED_DIMS = {"B": 512, "L": 768, "H": 1024, "test": 8}
_PREFIX = "visual."
_HINT = ("Hint: pick the CLIP variant of the file (clip-B/32 for ViT-B-32, clip-L/14 for "
         "ViT-L-14) and pass open_clip's file (open_clip_model.safetensors or "
         "open_clip_pytorch_model.bin: the visual.* keys), not a repository's "
         "model.safetensors (timm's or transformers' layout).")


def decode(variant: str) -> tuple[str, vit_options.TowerOptions]:
  """"clip-B/16" -> ("B/16", CLIP's options with QuickGELU); "-gelu": exact GELU."""
  usage = f"clip-<B|L|H>/<patch>[-gelu], e.g. {', '.join(NAMED_VARIANTS[:3])}"
  vit_variant, exact_gelu = tower_family.parse_variant(variant, "clip-", "-gelu", usage)
  size_name = vit_variant.split("/")[0]
  if size_name not in EMBED_DIMS:
    raise ValueError(f"Unknown variant {variant!r}: CLIP has no {size_name} tower; use {usage}")
  return vit_variant, vit_options.TowerOptions(
      patch_bias=False, ln_pre=True, layer_norm_epsilon=1e-5,
      ffn="gelu" if exact_gelu else "quick_gelu", projection=EMBED_DIMS[size_name])


def _layout(variant: str) -> dict:
  """``visual.*`` keys -> (model key, shape)."""
  vit_variant, options = decode(variant)
  size, patch = vit_variants.decode_variant(vit_variant)
  width, mlp = size.width, size.mlp_dim
  v = _PREFIX
  layout = {
      v + "conv1.weight": ("embedding/kernel", (width, 3, patch, patch)),
      v + "class_embedding": ("cls", (width,)),
      v + "positional_embedding": ("Transformer/posembed_input/pos_embedding", (-1, width)),
      v + "ln_pre.weight": ("Transformer/ln_pre/scale", (width,)),
      v + "ln_pre.bias": ("Transformer/ln_pre/bias", (width,)),
      v + "ln_post.weight": ("Transformer/encoder_norm/scale", (width,)),
      v + "ln_post.bias": ("Transformer/encoder_norm/bias", (width,)),
      v + "proj": ("projection/kernel", (width, options.projection)),
  }
  for i in range(size.depth):
    block, ours = f"{v}transformer.resblocks.{i}.", f"Transformer/encoderblock_{i}/"
    attention = ours + "MultiHeadDotProductAttention_0/"
    for theirs, mine in (("ln_1", "LayerNorm_0"), ("ln_2", "LayerNorm_1")):
      layout[f"{block}{theirs}.weight"] = (f"{ours}{mine}/scale", (width,))
      layout[f"{block}{theirs}.bias"] = (f"{ours}{mine}/bias", (width,))
    layout.update({
        block + "attn.in_proj_weight": (attention + "{query,key,value}/kernel", (3 * width, width)),
        block + "attn.in_proj_bias": (attention + "{query,key,value}/bias", (3 * width,)),
        block + "attn.out_proj.weight": (attention + "out/kernel", (width, width)),
        block + "attn.out_proj.bias": (attention + "out/bias", (width,)),
        block + "mlp.c_fc.weight": (ours + "MlpBlock_0/Dense_0/kernel", (mlp, width)),
        block + "mlp.c_fc.bias": (ours + "MlpBlock_0/Dense_0/bias", (mlp,)),
        block + "mlp.c_proj.weight": (ours + "MlpBlock_0/Dense_1/kernel", (width, mlp)),
        block + "mlp.c_proj.bias": (ours + "MlpBlock_0/Dense_1/bias", (width,)),
    })
  return layout


def convert_torch(state_dict: Mapping[str, Any], variant: str) -> dict[str, np.ndarray]:
  """A CLIP state dict's image tower (``visual.*``) -> the model's flat keys (strict)."""
  arrays = tower_family.tower_state(state_dict, _PREFIX, bare_key="conv1.weight")
  return torch_vit_layout.checked_conversion(
      arrays, _layout(variant), variant, tower_family.size_of(variant, decode), _HINT)


# partial-k also trains what follows the blocks: ln_post and proj.
FAMILIES = {"clip": tower_family.make_family(
    "clip", decode, convert_torch, final_norm=r"(Transformer/encoder_norm|projection)/.*")}
