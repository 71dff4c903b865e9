"""DINOv2 (facebookresearch/dinov2): "dinov2-<S|B|L|g>/14", register models "...-reg".

The tower (``vit_options``): the plain ViT's pre-LN blocks (LayerNorm eps
1e-6, exact GELU; ViT-g: SwiGLU, ``ffn_layer="swiglufused"``) with LayerScale
on both branches (``ls1.gamma``, ``ls2.gamma``); the position embedding is
stored at the checkpoint's 37 x 37 grid (518 px / 14) and interpolated in
every forward as ``interpolate_pos_encoding`` does (``posemb_interpolation``:
bicubic with scale (g + 0.1) / 37 for the original models, bicubic with
antialias to size g for the register models); the register models' 4
``register_tokens`` follow CLS after the position embedding. Prompts go after
CLS and the registers: [CLS, registers, prompts, patches]. Features: CLS after
the final ``norm`` (``x_norm_clstoken``, what DINOv2's linear heads read).

Checkpoints: the official ``dinov2_vitb14_pretrain.pth`` /
``dinov2_vitb14_reg4_pretrain.pth`` state dicts (``block_chunks=0`` names
``blocks.i``); ``mask_token`` (masked-image pretraining only) is dropped.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vpt_jax.models import tower_family
from vpt_jax.models import torch_vit_layout
from vpt_jax.models import vit_family
from vpt_jax.models import vit_options
from vpt_jax.models import vit_variants

PREFIX = "dinov2-"
NAMED_VARIANTS = ("dinov2-S/14", "dinov2-B/14", "dinov2-L/14", "dinov2-g/14",
                  "dinov2-S/14-reg", "dinov2-B/14-reg", "dinov2-L/14-reg", "dinov2-g/14-reg")
NUM_REGISTERS = 4
TRAINING_IMAGE_SIZE = 518  # the checkpoints' position embedding covers 518 // patch
_SWIGLU_SIZES = ("g", "testg")
# Test sizes store a 5 x 5 grid so that 16 px test images (4 x 4) interpolate.
_TEST_GRID = 5
_HINT = ("Hint: pick the DINOv2 variant of the file (dinov2-B/14 for dinov2_vitb14_pretrain.pth, "
         "dinov2-B/14-reg for dinov2_vitb14_reg4_pretrain.pth).")


def decode(variant: str) -> tuple[str, vit_options.TowerOptions]:
  """"dinov2-B/14-reg" -> ("B/14", its TowerOptions)."""
  vit_variant, registers = tower_family.parse_variant(
      variant, "dinov2-", "-reg",
      f"dinov2-<S|B|L|g>/14[-reg], e.g. {', '.join(NAMED_VARIANTS[:4])}")
  size_name = vit_variant.split("/")[0]
  _, patch = vit_variants.decode_variant(vit_variant)
  grid = _TEST_GRID if size_name.startswith("test") else TRAINING_IMAGE_SIZE // patch
  return vit_variant, vit_options.TowerOptions(
      registers=NUM_REGISTERS if registers else 0, layer_scale=True,
      ffn="swiglu" if size_name in _SWIGLU_SIZES else "gelu", posemb_grid=grid,
      # dinov2/hub/backbones.py: offset 0.1 without antialias; the *_reg models 0, with.
      interpolate_offset=0.0 if registers else 0.1, interpolate_antialias=registers)


def _layout(variant: str) -> dict:
  """The official file's keys -> (model key, shape)."""
  vit_variant, options = decode(variant)
  size, _ = vit_variants.decode_variant(vit_variant)
  width, hidden = size.width, size.mlp_dim
  layout = vit_family.torch_layout(vit_variant)
  layout["pos_embed"] = (layout["pos_embed"][0], (1, 1 + options.posemb_grid ** 2, width))
  if options.registers:
    layout["register_tokens"] = ("Transformer/registers", (1, options.registers, width))
  for i in range(size.depth):
    block, ours = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    layout[block + "ls1.gamma"] = (ours + "ls1/gamma", (width,))
    layout[block + "ls2.gamma"] = (ours + "ls2/gamma", (width,))
    if options.ffn == "swiglu":  # mlp.w12 (2h, D) and mlp.w3 (D, h) replace fc1/fc2
      for old in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        del layout[block + "mlp." + old]
      layout.update({
          block + "mlp.w12.weight": (ours + "MlpBlock_0/w12/kernel", (2 * hidden, width)),
          block + "mlp.w12.bias": (ours + "MlpBlock_0/w12/bias", (2 * hidden,)),
          block + "mlp.w3.weight": (ours + "MlpBlock_0/w3/kernel", (width, hidden)),
          block + "mlp.w3.bias": (ours + "MlpBlock_0/w3/bias", (width,))})
  return layout


def convert_torch(state_dict: Mapping[str, Any], variant: str) -> dict[str, np.ndarray]:
  """An official DINOv2 state dict -> the model's flat keys (strict; see the module)."""
  arrays = {key: value for key, value in state_dict.items()
            if key != "mask_token" and not key.startswith("head.")}
  return torch_vit_layout.checked_conversion(
      arrays, _layout(variant), variant, tower_family.size_of(variant, decode), _HINT)


FAMILIES = {"dinov2": tower_family.make_family("dinov2", decode, convert_torch)}
