"""What the DINOv2, CLIP and SigLIP families share: a variant decodes to a ViT
size/patch and ``vit_options.TowerOptions``, and the tower is
``vit.VisionTransformer`` with those options.

Each family module supplies ``decode(variant) -> (vit variant, options)`` and
its converters; ``make_family`` turns them into a ``backbones.Family``. Every
method runs on these towers through the usual hooks, with the prompts placed
by ``TowerOptions.prefix_tokens``; the ablation pools (``prompt.pool`` other
than "original") index [CLS, prompts, patches] and are refused.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

from vpt_jax import errors
from vpt_jax.models import backbones
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models import vit
from vpt_jax.models import vit_family
from vpt_jax.models import vit_options
from vpt_jax.models import vit_variants

Decode = Callable[[str], tuple[str, vit_options.TowerOptions]]


def validate(spec: Mapping[str, Any], method: hooks_lib.Method, decode: Decode) -> None:
  """Patch divisibility, the pool, the options and the method's settings."""
  vit_variant, options = decode(spec["variant"])
  vit_options.check(options)
  if spec["pool"] != "original":
    raise errors.UserError(
        f"prompt.pool={spec['pool']!r} is defined for the plain ViT only; {spec['variant']} "
        "pools its own way (CLS or MAP): set --config.prompt.pool=original")
  if options.ffn == "swiglu" and method.hooks(spec).changes_mlp_projections:
    raise errors.UserError(
        f"method {method.name!r} changes the MLP's two Dense layers, which {spec['variant']}'s "
        "SwiGLU FFN does not have; use a DINOv2 size with the GELU MLP (S, B, L) or another "
        "method")
  vit_family.validate(dict(spec, variant=vit_variant), method)


def build(spec: Mapping[str, Any], num_classes: int, method: hooks_lib.Method,
          decode: Decode) -> vit.VisionTransformer:
  """``vit.VisionTransformer`` of the decoded size with the tower's options."""
  vit_variant, options = decode(spec["variant"])
  return vit_family.build(dict(spec, variant=vit_variant), num_classes, method).clone(
      options=options)


def make_family(name: str, decode: Decode,
                convert_torch: Optional[Callable[[Mapping[str, Any], str], dict]],
                final_norm: str = r"Transformer/encoder_norm/.*",
                convert_npz=None) -> backbones.Family:
  """The ``backbones.Family`` of a tower family (remat, model.attention, all methods)."""
  return backbones.Family(
      name=name,
      build=lambda spec, num_classes, method: build(spec, num_classes, method, decode),
      validate=lambda spec, method: validate(spec, method, decode),
      block_patterns=lambda variant: vit_family.block_patterns(decode(variant)[0]),
      final_norm=final_norm, convert_torch=convert_torch, convert_npz=convert_npz,
      supports_remat=True, supports_attention_kernels=True)


def size_of(variant: str, decode: Decode) -> vit_variants.ViTSize:
  """The ViT size a tower variant decodes to."""
  return vit_variants.decode_variant(decode(variant)[0])[0]


def tower_state(state_dict: Mapping[str, Any], prefix: str, bare_key: str) -> dict[str, Any]:
  """The image tower's ``prefix``* entries of a two-tower state dict; a bare tower's
  state dict (it holds ``bare_key`` unprefixed) gets ``prefix`` added to every key."""
  arrays = {key: value for key, value in state_dict.items() if key.startswith(prefix)}
  if not arrays and bare_key in state_dict:
    arrays = {prefix + key: value for key, value in state_dict.items()}
  return arrays


def parse_variant(variant: str, prefix: str, suffix: str, usage: str) -> tuple[str, bool]:
  """"<prefix><size>/<patch>[<suffix>]" -> ("<size>/<patch>", whether the suffix is there).

  Raises ValueError naming ``usage`` (the accepted forms, with examples).
  """
  match = re.fullmatch(re.escape(prefix) + r"(\w+/\d+)(" + re.escape(suffix) + ")?", variant)
  if not match or match.group(1).split("/")[0] not in vit_variants.VIT_SIZES:
    raise ValueError(f"Unknown variant {variant!r}; use {usage}")
  return match.group(1), bool(match.group(2))
