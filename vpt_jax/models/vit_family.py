"""The ViT family for ``backbones``: supervised ViTs and their MAE/MoCo flavours.

Builds ``vit.VisionTransformer`` from a model spec, checks the spec and names
the blocks (``Transformer/encoderblock_i``) for partial-k.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp

from vpt_jax.models import backbones
from vpt_jax.models import methods as methods_lib
from vpt_jax.models import prompts as prompts_lib
from vpt_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Spec section -> the VisionTransformer attribute and options class it fills.
OPTIONS = {
    "cvpt": ("cvpt_options", vit.CvptOptions),
    "e2vpt": ("e2vpt_options", vit.E2vptOptions),
    "vfpt": ("vfpt_options", vit.VfptOptions),
    "adapter": ("adapter_options", vit.AdapterOptions),
    "lora": ("lora_options", vit.LoraOptions),
    "sidetune": ("side_options", vit.SideOptions),
}


def _fail(message: str):
  raise ValueError(message)


def _validate_settings(method: methods_lib.Method, spec: Mapping[str, Any]) -> None:
  """Checks the method's settings section against the model."""
  size, _ = vit.decode_variant(spec["variant"])
  settings = spec.get(method.settings) or {}
  if method.settings and method.settings != "mlp" and not settings:
    _fail(f"spec of method {method.name} lacks its {method.settings!r} settings")
  name = method.settings
  if name == "cvpt":
    if settings["num_prompts"] < 1:
      _fail(f"cvpt needs prompt.num_prompts >= 1, got {settings['num_prompts']}")
    if settings["insert"] not in vit.CVPT_INSERTS:
      _fail(f"cvpt.insert must be one of {vit.CVPT_INSERTS} (3 is the reference's), got "
            f"{settings['insert']}")
  elif name == "adapter":
    if settings["init"] not in vit.ADAPTER_INITS:
      _fail(f"Unknown adapter.init {settings['init']!r}; choose one of {vit.ADAPTER_INITS}")
    if not 1 <= settings["reduction"] <= size.width:
      _fail(f"adapter.reduction {settings['reduction']} leaves no bottleneck for width "
            f"{size.width}; the paper uses 8, 64 or 256")
  elif name == "lora":
    unknown = sorted(set(settings["targets"]) - set(vit.LORA_TARGETS))
    if unknown or not settings["targets"]:
      _fail(f"lora.targets {settings['targets']} must be a non-empty comma-separated subset "
            f"of {', '.join(vit.LORA_TARGETS)}")
    if settings["rank"] < 1:
      _fail(f"lora.rank must be >= 1, got {settings['rank']}")
  elif name == "vfpt":
    if settings["dimension"] not in prompts_lib.FOURIER_DIMENSIONS:
      _fail(f"Unknown vfpt.dimension {settings['dimension']!r}; choose one of "
            f"{prompts_lib.FOURIER_DIMENSIONS}")
    if math.floor(spec["num_prompts"] * settings["percentage"]) < 1 or settings["percentage"] > 1:
      _fail(f"vfpt.percentage {settings['percentage']} of {spec['num_prompts']} prompts "
            "Fourier-transforms no prompt (or more than all); use a value in (0, 1] with "
            "floor(num_prompts * percentage) >= 1")
  elif name == "e2vpt":
    if settings["num_prompts"] < 1:
      _fail(f"e2vpt.kv_prompts must be >= 1, got {settings['num_prompts']}")
  elif name == "sidetune":
    if not settings["widths"] or min(settings["widths"]) < 1:
      _fail(f"sidetune.widths {settings['widths']} must be positive channel counts, "
            "e.g. '32,64,128'")


def validate(spec: Mapping[str, Any], method: methods_lib.Method) -> None:
  """ViT-specific checks: patch divisibility, pool and the method's settings."""
  _, patch = vit.decode_variant(spec["variant"])
  if spec["image_size"] < patch or spec["image_size"] % patch:
    raise ValueError(
        f"image size {spec['image_size']} is not divisible by the patch size {patch} of "
        f"{spec['variant']}; use e.g. {max(patch, spec['image_size'] // patch * patch)}")
  if spec["pool"] not in vit.POOL_TYPES:
    raise ValueError(f"Unknown pool {spec['pool']!r}; choose one of {vit.POOL_TYPES}")
  _validate_settings(method, spec)


def build(spec: Mapping[str, Any], num_classes: int,
          method: methods_lib.Method) -> vit.VisionTransformer:
  """The ``vit.VisionTransformer`` of a (validated) spec."""
  options = {}
  if method.settings in OPTIONS:
    attribute, options_class = OPTIONS[method.settings]
    # JSON turns tuples into lists; options must stay hashable.
    options[attribute] = options_class(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in spec[method.settings].items()})
  return vit.VisionTransformer(
      num_classes=num_classes,
      variant=spec["variant"],
      dropout_rate=spec["dropout_rate"],
      backbone_dropout=method.backbone_dropout,
      num_prompts=spec["num_prompts"],
      deep_prompts=method.deep_prompts,
      prompt_dropout=spec["prompt_dropout"],
      prompt_projection=spec["prompt_projection"],
      pool=spec["pool"],
      skip_dead_work=spec["skip_dead_work"],
      head_hidden_layers=method.head_hidden_layers,
      head_dropout=(spec.get("mlp") or {}).get("dropout", 0.1),
      head_init=method.head_init,
      dtype=DTYPES[spec["dtype"]],
      **options)


def block_patterns(variant: str) -> list[str]:
  """``Transformer/encoderblock_i`` for every block, in order."""
  size, _ = vit.decode_variant(variant)
  return [f"Transformer/encoderblock_{i}" for i in range(size.depth)]


FAMILIES = {"vit": backbones.Family(
    name="vit", build=build, validate=validate, block_patterns=block_patterns,
    final_norm=r"Transformer/encoder_norm/.*")}
