"""The ViT variants: sizes, self-supervised flavours and how a variant string decodes.

"<size>/<patch>" (e.g. "B/16"), optionally prefixed by a flavour ("mae-B/16",
"moco-B/16"); ``geometry`` gives the sizes a method's additions are shaped by.
"""

from __future__ import annotations

import dataclasses

from vpt_jax import errors
from vpt_jax.models import backbones
from vpt_jax.models import hooks as hooks_lib


@dataclasses.dataclass(frozen=True)
class ViTSize:
  """Width, MLP width, heads and depth of one ViT family member."""
  width: int
  mlp_dim: int
  num_heads: int
  depth: int


# The vision_transformer sizes, plus small members for tests and the quickstart.
VIT_SIZES = {
    "Ti": ViTSize(width=192, mlp_dim=768, num_heads=3, depth=12),
    "S": ViTSize(width=384, mlp_dim=1536, num_heads=6, depth=12),
    "B": ViTSize(width=768, mlp_dim=3072, num_heads=12, depth=12),
    "L": ViTSize(width=1024, mlp_dim=4096, num_heads=16, depth=24),
    "H": ViTSize(width=1280, mlp_dim=5120, num_heads=16, depth=32),
    # DINOv2's giant (its SwiGLU hidden width: 2/3 of 4 x 1536, rounded up to 8)
    # and SigLIP's shape-optimised So400m.
    "g": ViTSize(width=1536, mlp_dim=4096, num_heads=24, depth=40),
    "So400m": ViTSize(width=1152, mlp_dim=4304, num_heads=16, depth=27),
    "micro": ViTSize(width=96, mlp_dim=192, num_heads=3, depth=6),
    "nano": ViTSize(width=64, mlp_dim=128, num_heads=4, depth=4),  # the quickstart's
    "test": ViTSize(width=16, mlp_dim=32, num_heads=2, depth=2),
    "test4": ViTSize(width=16, mlp_dim=32, num_heads=2, depth=4),  # partial-k tests
    "testg": ViTSize(width=16, mlp_dim=24, num_heads=2, depth=2),  # DINOv2 SwiGLU tests
}
# The variants users name (the checkpoints that exist); any "<size>/<patch>" works.
NAMED_VARIANTS = ("Ti/16", "S/16", "B/16", "B/32", "L/16", "H/14")


# Self-supervised flavours of the same architecture, selected by a variant
# prefix ("mae-B/16", "moco-B/16"; "" = the supervised ViT). What differs is
# the position embedding, the final norm and the pooling (vpt.md 1.8):
#   mae:  MAE's fixed 2-D sin-cos embedding as loaded from its checkpoint (a
#         parameter, trained only by `full`, like the reference's timm model);
#         no final norm; the features are fc_norm(mean of the non-CLS tokens),
#         prompts included, with a fresh LayerNorm ``fc_norm``.
#   moco: MoCo v3's fixed 2-D sin-cos embedding, never trained (it lives under
#         ``Transformer/posembed_fixed`` so the family can freeze it for every
#         method); CLS after the final norm, as the supervised ViT.
FLAVOURS = ("", "mae", "moco")
# Flavour -> the position embedding's module name and initialisation (see
# AddPositionEmbs.init_scheme).
FLAVOUR_POSEMB = {"": ("posembed_input", "learned"),
                  "mae": ("posembed_input", "sincos_columns_first"),
                  "moco": ("posembed_fixed", "sincos_rows_first")}
# The reference fine-tunes MAE with stochastic depth 0.1 (its `full` baseline,
# timm drop_path_rate); the supervised ViT and MoCo v3 use none.
FLAVOUR_DROP_PATH = {"": 0.0, "mae": 0.1, "moco": 0.0}


def _split_flavour(variant: str) -> tuple[str, str]:
  """"mae-B/16" -> ("mae", "B/16"); "B/16" -> ("", "B/16")."""
  prefix, sep, rest = variant.partition("-")
  if sep and prefix in FLAVOURS[1:]:
    return prefix, rest
  return "", variant


def variant_flavour(variant: str) -> str:
  """The flavour of a variant: "" (supervised), "mae" or "moco"."""
  decode_variant(variant)  # unknown variants fail here, with the choices
  return _split_flavour(variant)[0]


def decode_variant(variant: str) -> tuple[ViTSize, int]:
  """Parses "B/16" (or "mae-B/16", "moco-B/16") into (ViTSize, patch_size).

  The flavour prefix is ignored here (see ``variant_flavour``); unknown
  variants raise ValueError with the choices.
  """
  _, rest = _split_flavour(variant)
  size_name, sep, patch = rest.partition("/")
  if not sep or size_name not in VIT_SIZES or not patch.isdigit() or int(patch) < 1:
    raise errors.UserError(
        f"Unknown ViT variant {variant!r} (other families: "
        f"{', '.join(prefix for _, prefix, _ in backbones.FAMILY_MODULES if prefix)}). "
        f"Use '<size>/<patch>' with size in "
        f"{sorted(VIT_SIZES)}, e.g. {', '.join(NAMED_VARIANTS)}, optionally prefixed "
        f"by a self-supervised flavour ({', '.join(f + '-' for f in FLAVOURS[1:])}, "
        "e.g. mae-B/16)"
        + (backbones.did_you_mean(variant, sorted(set(NAMED_VARIANTS + backbones.PAPER_VARIANTS)),
                                  cutoff=0.5) or "."))
  return VIT_SIZES[size_name], int(patch)


def geometry(variant: str) -> hooks_lib.Geometry:
  """The sizes of a ViT variant that shape a method's additions (``hooks.Geometry``)."""
  size, patch = decode_variant(variant)
  return hooks_lib.Geometry(size.depth, size.width, size.num_heads, patch, size.mlp_dim)
