"""The Swin family for ``backbones``: validate and build from a model spec, name the
blocks for partial-k, convert the official microsoft/Swin-Transformer state dicts.

``skip_dead_work`` has no further effect on Swin.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from vpt_jax import errors
from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.models import backbones
from vpt_jax.models import hooks
from vpt_jax.models.swin import NAMED_VARIANTS
from vpt_jax.models.swin import SwinTransformer
from vpt_jax.models.swin import decode_variant
from vpt_jax.models.swin import image_size_unit
from vpt_jax.models.swin_blocks import MLP_RATIO

POOL_TYPES = ("original",)
SUPPORTED_METHODS = ("linear", "full", "partial-", "mlp-", "bias", "vpt_shallow", "vpt_deep",
                     "vpt+bias")


def validate(spec: Mapping[str, Any], method: hooks.Method) -> None:
  """Swin checks: size, image size, pool, prompt projection."""
  unit = image_size_unit(spec["variant"])  # unknown variants fail here
  image_size = spec["image_size"]
  if image_size < unit or image_size % unit:
    suggestion = unit * max(1, round(image_size / unit))
    raise errors.UserError(
        f"image size {image_size} does not fit {spec['variant']}: it must be a multiple of "
        f"patch x window x 2^(stages - 1) = {unit}; use e.g. {suggestion}")
  if spec["pool"] not in POOL_TYPES:
    raise errors.UserError(f"pool {spec['pool']!r} is not defined for Swin, which averages all "
                           f"tokens as the reference; use pool='original'")
  if spec.get("prompt_projection", -1) >= 1:
    raise errors.UserError("prompt.projection is not supported for Swin (the reference defines "
                           "the projection but never applies it); use prompt.projection=-1")


def build(spec: Mapping[str, Any], num_classes: int,
          method: hooks.Method) -> SwinTransformer:
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
      attention_kernel=spec.get("attention", "einsum"),  # specs written before it: einsum
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
    supported_methods=SUPPORTED_METHODS, supports_attention_kernels=True)}
