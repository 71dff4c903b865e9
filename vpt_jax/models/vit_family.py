"""The ViT family for ``backbones``: supervised ViTs and their MAE/MoCo flavours.

Builds ``vit.VisionTransformer`` from a model spec, checks the spec, names
the blocks (``Transformer/encoderblock_i``) for partial-k and converts timm-style
PyTorch state dicts (MAE, MoCo v3, timm ViTs) to the model's names
(``convert_torch``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from vpt_jax import errors
from vpt_jax.models import backbones
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models import torch_vit_layout
from vpt_jax.models import vit_variants
from vpt_jax.models import vit


def validate(spec: Mapping[str, Any], method: hooks_lib.Method) -> None:
  """ViT-specific checks: patch divisibility, pool and the method's settings."""
  size, patch = vit_variants.decode_variant(spec["variant"])
  if vit_variants.variant_flavour(spec["variant"]) and size.width % 4:
    raise errors.UserError(f"{spec['variant']} uses a 2-D sin-cos position embedding, which "
                           f"needs a width divisible by 4 (got {size.width})")
  if spec["image_size"] < patch or spec["image_size"] % patch:
    raise errors.UserError(
        f"image size {spec['image_size']} is not divisible by the patch size {patch} of "
        f"{spec['variant']}; use e.g. {max(patch, spec['image_size'] // patch * patch)}")
  if spec["pool"] not in vit.POOL_TYPES:
    raise errors.UserError(f"Unknown pool {spec['pool']!r}; choose one of {vit.POOL_TYPES}")
  method.check_settings(spec, vit_variants.geometry(spec["variant"]))


def build(spec: Mapping[str, Any], num_classes: int,
          method: hooks_lib.Method) -> vit.VisionTransformer:
  """The ``vit.VisionTransformer`` of a (validated) spec, with the method's hooks."""
  return vit.VisionTransformer(
      num_classes=num_classes,
      variant=spec["variant"],
      dropout_rate=spec["dropout_rate"],
      backbone_dropout=method.backbone_dropout,
      pool=spec["pool"],
      skip_dead_work=spec["skip_dead_work"],
      dtype=backbones.DTYPES[spec["dtype"]],
      remat=spec.get("remat", "none"),  # specs written before the field: none
      attention_kernel=spec.get("attention", "einsum"),  # likewise
      hooks=method.hooks(spec),
      **backbones.head_settings(spec, method))


def block_patterns(variant: str) -> list[str]:
  """``Transformer/encoderblock_i`` for every block, in order."""
  size, _ = vit_variants.decode_variant(variant)
  return [f"Transformer/encoderblock_{i}" for i in range(size.depth)]


# ----------------------------------------------------------------------------
# PyTorch (timm-style) state dicts: MAE, MoCo v3 and timm ViTs.

# Keys that are not part of the backbone, dropped by every conversion: the
# classifier (timm "head", MoCo v3's projection MLP "head.*") and timm's
# 21k "pre_logits" layer, which the reference does not use either.
_TORCH_DROPPED = (r"head\..*", r"pre_logits\..*")
# MAE's pretraining decoder (in its "visualize" checkpoints) and the encoder's
# final norm, which the reference's global-pool model deletes (vpt.md 1.8).
_MAE_DROPPED = (r"decoder_.*", r"mask_token", r"norm\.(weight|bias)")
# MoCo v3 pretraining checkpoints hold both encoders and the predictor; the
# backbone is the base encoder.
_MOCO_ENCODER = "base_encoder."
_MOCO_OTHERS = ("momentum_encoder.", "predictor.")


def _strip_wrappers(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """Removes "module." and MoCo's "base_encoder."; returns (arrays, dropped keys)."""
  arrays = dict(state_dict)
  if arrays and all(key.startswith("module.") for key in arrays):
    arrays = {key[len("module."):]: value for key, value in arrays.items()}
  dropped = []
  if any(key.startswith(_MOCO_ENCODER) for key in arrays):
    dropped = [key for key in arrays if key.startswith(_MOCO_OTHERS)]
    arrays = {key[len(_MOCO_ENCODER):] if key.startswith(_MOCO_ENCODER) else key: value
              for key, value in arrays.items() if not key.startswith(_MOCO_OTHERS)}
  return arrays, dropped


def torch_layout(variant: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """timm key -> (model key, timm shape) for every tensor of the variant.

  The position embedding's token count is left as -1: it is resampled on
  merge when the image size differs.
  """
  size, patch = vit_variants.decode_variant(variant)
  flavour = vit_variants.variant_flavour(variant)
  width, mlp = size.width, size.mlp_dim
  posemb_module = vit_variants.FLAVOUR_POSEMB[flavour][0]
  layout = {
      "cls_token": ("cls", (1, 1, width)),
      "pos_embed": (f"Transformer/{posemb_module}/pos_embedding", (1, -1, width)),
      "patch_embed.proj.weight": ("embedding/kernel", (width, 3, patch, patch)),
      "patch_embed.proj.bias": ("embedding/bias", (width,)),
  }
  for i in range(size.depth):
    block, ours = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    attention = ours + "MultiHeadDotProductAttention_0/"
    layout.update({
        block + "norm1.weight": (ours + "LayerNorm_0/scale", (width,)),
        block + "norm1.bias": (ours + "LayerNorm_0/bias", (width,)),
        # Fused q/k/v, split on conversion (model keys named by their prefix).
        block + "attn.qkv.weight": (attention + "{query,key,value}/kernel", (3 * width, width)),
        block + "attn.qkv.bias": (attention + "{query,key,value}/bias", (3 * width,)),
        block + "attn.proj.weight": (attention + "out/kernel", (width, width)),
        block + "attn.proj.bias": (attention + "out/bias", (width,)),
        block + "norm2.weight": (ours + "LayerNorm_1/scale", (width,)),
        block + "norm2.bias": (ours + "LayerNorm_1/bias", (width,)),
        block + "mlp.fc1.weight": (ours + "MlpBlock_0/Dense_0/kernel", (mlp, width)),
        block + "mlp.fc1.bias": (ours + "MlpBlock_0/Dense_0/bias", (mlp,)),
        block + "mlp.fc2.weight": (ours + "MlpBlock_0/Dense_1/kernel", (width, mlp)),
        block + "mlp.fc2.bias": (ours + "MlpBlock_0/Dense_1/bias", (width,)),
    })
  if flavour == "mae":
    layout["fc_norm.weight"] = ("fc_norm/scale", (width,))
    layout["fc_norm.bias"] = ("fc_norm/bias", (width,))
  else:
    layout["norm.weight"] = ("Transformer/encoder_norm/scale", (width,))
    layout["norm.bias"] = ("Transformer/encoder_norm/bias", (width,))
  return layout


_FLAVOUR_HINT = ("Hint: pick the variant of the checkpoint (e.g. mae-B/16 for "
                 "mae_pretrain_vit_base.pth, moco-B/16 for linear-vit-b-300ep.pth.tar).")


def convert_torch(state_dict: Mapping[str, Any], variant: str) -> dict[str, np.ndarray]:
  """A timm-style ViT state dict (MAE, MoCo v3, timm) -> the model's flat keys.

  Names (timm / MAE / MoCo v3, vpt.md 3): ``cls_token``, ``pos_embed``,
  ``patch_embed.proj.{weight,bias}``, ``blocks.{i}.{norm1, attn.qkv, attn.proj,
  norm2, mlp.fc1, mlp.fc2}.{weight,bias}``, ``norm`` (``fc_norm`` for MAE).
  Linear weights (out, in) are transposed; the fused ``attn.qkv`` (3D, D) is
  split into query/key/value kernels (D, heads, D/heads) and biases (heads,
  D/heads): output row ``w * D + h * D/heads + d`` of the fused projection is
  head h, dimension d of q/k/v for w = 0/1/2 (timm's reshape). ``attn.proj``
  (D, D) becomes the out kernel (heads, D/heads, D); the patch convolution
  (D, 3, P, P) becomes HWIO (P, P, 3, D).

  Flavours: MAE drops ``norm`` (the reference replaces it by a fresh
  ``fc_norm``: ones and zeros unless the file has one) and any pretraining
  decoder; MoCo v3's position embedding goes to ``Transformer/posembed_fixed``;
  MoCo v3 pretraining files keep only ``base_encoder.``. A ``module.`` prefix
  and every classifier (``head.*``, ``pre_logits.*``) are dropped.

  Raises:
    npz.CheckpointMismatchError: listing the missing keys, the unexpected keys
      and the shape mismatches (file names), with the file's architecture.
  """
  flavour = vit_variants.variant_flavour(variant)
  size, _ = vit_variants.decode_variant(variant)
  arrays, _ = _strip_wrappers(state_dict)
  dropped = _TORCH_DROPPED + (_MAE_DROPPED if flavour == "mae" else ())
  arrays = {key: value for key, value in arrays.items()
            if not any(re.fullmatch(pattern, key) for pattern in dropped)}
  layout = torch_layout(variant)
  if flavour == "mae":  # the reference's fc_norm is new: LayerNorm's own init
    arrays.setdefault("fc_norm.weight", np.ones(size.width, np.float32))
    arrays.setdefault("fc_norm.bias", np.zeros(size.width, np.float32))
  return torch_vit_layout.checked_conversion(arrays, layout, variant, size, _FLAVOUR_HINT)


FAMILIES = {"vit": backbones.Family(
    name="vit", build=build, validate=validate, block_patterns=block_patterns,
    # MAE has no encoder_norm: partial-k trains its fc_norm instead.
    final_norm=r"(Transformer/encoder_norm|fc_norm)/.*",
    # MoCo v3's sin-cos position embedding is fixed (requires_grad=False in
    # the reference, even for full fine-tuning).
    always_frozen=(r"Transformer/posembed_fixed/.*",),
    convert_torch=convert_torch, supports_remat=True,
    supports_attention_kernels=True)}
