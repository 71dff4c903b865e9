"""timm's ViTs by their timm names: "timm-vit-b16" is the ViT-B/16 of
``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`` (and every other augreg or
original-port ViT of that size and patch).

The architecture is the plain ViT (``vit``: pre-LN blocks with LayerNorm eps
1e-6, exact GELU, CLS pooling after ``norm``), which is what timm builds for
these checkpoints (no LayerScale, ``norm_pre``/``fc_norm`` identities), so
this family only names the variants and reads timm's keys
(``vit_family.convert_torch``: ``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.i.{norm1, attn.qkv (fused 3D x D, q|k|v row blocks),
attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``; ``head`` dropped).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from vpt_jax.models import backbones
from vpt_jax.models import vit_family

PREFIX = "timm-vit-"
# timm-vit-<size letter><patch> -> our "<size>/<patch>".
_SIZES = {"s": "S", "b": "B", "l": "L", "ti": "Ti", "h": "H", "test": "test"}
NAMED_VARIANTS = ("timm-vit-s16", "timm-vit-s32", "timm-vit-b16", "timm-vit-b32",
                  "timm-vit-l16", "timm-vit-l32")


def vit_variant(variant: str) -> str:
  """"timm-vit-b16" -> "B/16" (ValueError naming the choices otherwise)."""
  match = re.fullmatch(r"timm-vit-([a-z]+)(\d+)", variant)
  if not match or match.group(1) not in _SIZES:
    raise ValueError(f"Unknown timm ViT {variant!r}; use timm-vit-<s|b|l><patch>, e.g. "
                     f"{', '.join(NAMED_VARIANTS)}"
                     + (backbones.did_you_mean(variant, NAMED_VARIANTS) or ""))
  return f"{_SIZES[match.group(1)]}/{match.group(2)}"


def _as_vit(spec: Mapping[str, Any]) -> dict[str, Any]:
  return dict(spec, variant=vit_variant(spec["variant"]))


def validate(spec, method) -> None:
  """The ViT family's checks on the translated variant."""
  vit_family.validate(_as_vit(spec), method)


def build(spec, num_classes: int, method):
  """``vit.VisionTransformer`` of the translated variant."""
  return vit_family.build(_as_vit(spec), num_classes, method)


def convert_torch(state_dict, variant: str):
  """timm's state dict -> the ViT's names (``vit_family.convert_torch``)."""
  return vit_family.convert_torch(state_dict, vit_variant(variant))


_VIT = vit_family.FAMILIES["vit"]
FAMILIES = {"timm": backbones.Family(
    name="timm", build=build, validate=validate,
    block_patterns=lambda variant: vit_family.block_patterns(vit_variant(variant)),
    final_norm=_VIT.final_norm, always_frozen=_VIT.always_frozen,
    convert_torch=convert_torch, supports_remat=True, supports_attention_kernels=True)}
