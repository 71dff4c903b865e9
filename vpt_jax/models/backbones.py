"""Backbone families: which module builds a variant and how its parts are named.

The variant string selects the family by its prefix, so configs keep one field
(``model.variant``):

==============  ==============================  =====================================
family          variants                        module
==============  ==============================  =====================================
vit             "B/16", "L/16", "H/14",         ``vit_family`` (MAE and MoCo v3 are
                "mae-B/16", "moco-B/16"          ViT flavours, see ``vit``)
swin            "swin-B/4w7"                    ``swin_family`` (model: ``swin``)
convnext        "convnext-B"                    ``convnet_family`` (model: ``convnext``)
resnet          "resnet-50"                     ``convnet_family`` (model: ``resnet``)
timm            "timm-vit-b16"                  ``timm_family`` (the plain ViT, timm keys)
dinov2          "dinov2-B/14[-reg]"             ``dinov2_family`` (ViT + ``vit_options``)
clip            "clip-B/16[-gelu]"              ``clip_family`` (ViT + ``vit_options``)
siglip          "siglip-So400m/14[-patchmap]"   ``siglip_family`` (ViT + ``vit_options``)
==============  ==============================  =====================================

Each family module exposes ``FAMILIES``, {name: ``Family``}, whose functions take the
model spec of ``methods.factory.model_spec`` (a plain dict) and the method
(read through ``hooks.Method``: families never import a method).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax.numpy as jnp

from vpt_jax import errors

# family name -> (variant prefix, module); the first matching prefix wins and
# "" (the plain ViT) comes last.
FAMILY_MODULES = (
    ("swin", "swin-", "vpt_jax.models.swin_family"),
    ("timm", "timm-vit-", "vpt_jax.models.timm_family"),  # timm ViTs by timm name
    ("dinov2", "dinov2-", "vpt_jax.models.dinov2_family"),
    ("clip", "clip-", "vpt_jax.models.clip_family"),
    ("siglip", "siglip-", "vpt_jax.models.siglip_family"),
    ("convnext", "convnext-", "vpt_jax.models.convnet_family"),
    ("resnet", "resnet-", "vpt_jax.models.convnet_family"),
    ("vit", "", "vpt_jax.models.vit_family"),
)
# The backbones of the VPT paper, for "did you mean" suggestions across families.
PAPER_VARIANTS = ("B/16", "L/16", "H/14", "mae-B/16", "moco-B/16", "swin-B/4w7",
                  "convnext-B", "resnet-50")
# File name endings read as PyTorch state dicts (converted by the family).
TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin", ".safetensors",
                  ".safetensors.index.json", ".bin.index.json")  # + sharded (index JSON)
# spec["dtype"] -> the backbones' compute dtype (every family).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Family:
  """What the rest of the library needs to know about one backbone family.

  Attributes:
    name: "vit", "swin", ...
    build: (spec, num_classes, method) -> the Linen module, called on
      (B, H, W, 3) images with ``train``, ``return_features`` and
      ``from_features`` keywords like ``vit.VisionTransformer``.
    validate: (spec, method) -> None; raises ValueError naming the problem and
      the fix (unknown size, image size, settings the family does not take).
      ``methods.factory.validate_spec`` calls it after ``check_method``.
    block_patterns: variant -> regexes (without "/.*") of every block's
      parameters in forward order; partial-k trains the last k.
    final_norm: regex of the parameters after the last block that partial-k
      also trains (e.g. ``Transformer/encoder_norm/.*``).
    always_frozen: regexes no method trains (fixed position embeddings,
      BatchNorm statistics), put ahead of the method's rules.
    convert_torch: (state_dict of numpy arrays, variant) -> {model key: array}
      for ``checkpoints.merge.merge_backbone``; None if the family has no
      PyTorch checkpoints.
    convert_npz: (flat .npz arrays, variant) -> {model key: array} for
      families whose official ``.npz`` names differ from the model's (SigLIP's
      big_vision two-tower files); None: the ``.npz`` holds the model's names.
    supported_methods: method names (or prefixes ending in "-") the family
      defines; None = all.
    supports_remat: whether ``build`` honours ``model.remat`` (block
      rematerialisation); the others refuse it rather than ignore it.
    supports_attention_kernels: whether ``build`` honours ``model.attention``
      (``attention_kernels``); families without attention refuse a non-default.
  """
  name: str
  build: Callable[[Mapping[str, Any], int, Any], Any]
  validate: Callable[[Mapping[str, Any], Any], None]
  block_patterns: Callable[[str], Sequence[str]]
  final_norm: str
  always_frozen: tuple[str, ...] = ()
  convert_torch: Optional[Callable[[Mapping[str, Any], str], dict]] = None
  convert_npz: Optional[Callable[[Mapping[str, Any], str], dict]] = None
  supported_methods: Optional[tuple[str, ...]] = None
  supports_remat: bool = False
  supports_attention_kernels: bool = False

  def supports(self, method_name: str) -> bool:
    """Whether the family defines ``method_name`` (e.g. "partial-3")."""
    if self.supported_methods is None:
      return True
    return any(method_name == name or (name.endswith("-") and method_name.startswith(name))
               for name in self.supported_methods)

  def check_method(self, method_name: str) -> None:
    """Raises ValueError if the family does not define the method."""
    if not self.supports(method_name):
      names = ", ".join(n + "k" if n.endswith("-") else n for n in self.supported_methods)
      raise errors.UserError(f"method {method_name!r} is not defined for {self.name} backbones; "
                             f"choose one of {names}")


def _family_module(variant: str) -> tuple[str, str]:
  """(family name, module) of the first prefix the variant starts with."""
  for name, prefix, module in FAMILY_MODULES:
    if variant.startswith(prefix):
      return name, module
  raise AssertionError("the ViT family's empty prefix matches every variant")


def family_name(variant: str) -> str:
  """The family a variant belongs to, by its prefix ("swin-B/4w7" -> "swin")."""
  return _family_module(variant)[0]


def get_family(variant: str) -> Family:
  """The ``Family`` of a variant (imports its module on first use)."""
  name, module = _family_module(variant)
  return importlib.import_module(module).FAMILIES[name]


def head_settings(spec: Mapping[str, Any], method) -> dict[str, Any]:
  """The ``head_*`` attributes every family's module takes (see ``heads.backbone_head``)."""
  return dict(head_hidden_layers=method.head_hidden_layers,
              head_dropout=(spec.get("mlp") or {}).get("dropout", 0.1),
              head_init=method.head_init)


def did_you_mean(variant: str, candidates: Iterable[str], *, n: int = 3,
                 cutoff: float = 0.6) -> str:
  """"; did you mean a, b?" naming the candidates close to ``variant`` (ignoring
  case), or "" if none is."""
  lower = {candidate.lower(): candidate for candidate in candidates}
  close = [lower[c] for c in difflib.get_close_matches(variant.lower(), lower, n, cutoff)]
  return f"; did you mean {', '.join(close)}?" if close else ""


def is_torch_file(path: str) -> bool:
  """Whether a checkpoint path names a PyTorch state dict (by its ending)."""
  return str(path).endswith(TORCH_SUFFIXES)
