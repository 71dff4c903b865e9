"""SigLIP image towers (google-research/big_vision, transformers' Siglip):
"siglip-B/16", "siglip-L/16", "siglip-So400m/14"; "-patchmap" variants pool patches only.

big_vision ``vit.py`` with ``pool_type="map"``: no CLS token; a learned
position embedding (1, N, D) added to the patches; pre-LN blocks with
LayerNorm eps 1e-6 and flax's default tanh GELU (transformers:
``gelu_pytorch_tanh``); ``encoder_norm``; then the MAP head (``map_head``):
a learned probe attends over the tokens, y + MLP(LN(y)). The image tower has
no projection (big_vision's ``out_dim=(None, E)``).

Prompts go before the patches ([prompts, patches]; there is no CLS to follow).
The MAP probe attends to the prompts' outputs too by default (they are
encoder outputs like any token, as they would be for big_vision's head);
the "-patchmap" variants (e.g. "siglip-B/16-patchmap") let it read the patch
tokens only, so prompts act only through the patches.

Checkpoints: big_vision's ``.npz`` (``params/img/...``: the model's own names,
``img/pos_embedding`` -> ``Transformer/posembed_input/pos_embedding``; the text
tower ``params/txt/...`` and ``t``/``b`` are dropped) and transformers'
``vision_model.*`` state dicts (``model.safetensors`` of ``google/siglip-*``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.models import tower_family
from vpt_jax.models import torch_vit_layout
from vpt_jax.models import vit_options
from vpt_jax.models import vit_variants

NAMED_VARIANTS = ("siglip-B/16", "siglip-L/16", "siglip-So400m/14", "siglip-B/16-patchmap")
_HF = "vision_model."
_POSEMB = "Transformer/posembed_input/pos_embedding"
_HINT = ("Hint: pick the SigLIP variant of the file (siglip-B/16 for siglip-base-patch16-*, "
         "siglip-So400m/14 for siglip-so400m-patch14-*).")


def decode(variant: str) -> tuple[str, vit_options.TowerOptions]:
  """"siglip-B/16[-patchmap]" -> ("B/16", SigLIP's options)."""
  vit_variant, patch_map = tower_family.parse_variant(
      variant, "siglip-", "-patchmap",
      f"siglip-<B|L|So400m>/<patch>[-patchmap], e.g. {', '.join(NAMED_VARIANTS)}")
  return vit_variant, vit_options.TowerOptions(
      class_token=False, ffn="gelu_tanh", pooling="map", map_attends_prompts=not patch_map)


def convert_npz(arrays: Mapping[str, Any], variant: str) -> dict[str, np.ndarray]:
  """big_vision's two-tower ``.npz`` -> the image tower under the model's names.

  The strict check is the merge's (these are already the model's names).
  """
  decode(variant)
  image = {}
  for key, value in arrays.items():
    for prefix in ("params/img/", "img/"):
      if key.startswith(prefix):
        name = key[len(prefix):]
        image[_POSEMB if name == "pos_embedding" else name] = np.asarray(value)
  if not image:
    raise npz_lib.UnknownLayoutError(
        f"no image tower (params/img/...) in the .npz; {variant} reads big_vision's SigLIP "
        "checkpoints (e.g. webli_en_b16_224_63724782.npz)")
  return image


def _attention(theirs: str, ours: str, fused: bool, width: int) -> dict:
  """q/k/v/out projections (separate or a fused in_proj) -> layout entries."""
  if fused:
    layout = {theirs + "in_proj_weight": (ours + "{query,key,value}/kernel", (3 * width, width)),
              theirs + "in_proj_bias": (ours + "{query,key,value}/bias", (3 * width,))}
  else:
    layout = {f"{theirs}{t}_proj.{kind}": (f"{ours}{o}/{mine}", shape)
              for t, o in (("q", "query"), ("k", "key"), ("v", "value"))
              for kind, mine, shape in (("weight", "kernel", (width, width)),
                                        ("bias", "bias", (width,)))}
  layout[theirs + "out_proj.weight"] = (ours + "out/kernel", (width, width))
  layout[theirs + "out_proj.bias"] = (ours + "out/bias", (width,))
  return layout


def _pre_ln_mlp(theirs: str, ours: str, norm: str, ours_norm: str, width: int,
                hidden: int) -> dict:
  """A LayerNorm and ``mlp.fc1``/``mlp.fc2`` -> layout entries."""
  return {f"{theirs}{norm}.weight": (f"{ours}{ours_norm}/scale", (width,)),
          f"{theirs}{norm}.bias": (f"{ours}{ours_norm}/bias", (width,)),
          theirs + "mlp.fc1.weight": (ours + "MlpBlock_0/Dense_0/kernel", (hidden, width)),
          theirs + "mlp.fc1.bias": (ours + "MlpBlock_0/Dense_0/bias", (hidden,)),
          theirs + "mlp.fc2.weight": (ours + "MlpBlock_0/Dense_1/kernel", (width, hidden)),
          theirs + "mlp.fc2.bias": (ours + "MlpBlock_0/Dense_1/bias", (width,))}


def _hf_layout(variant: str) -> dict:
  """transformers' ``vision_model.*`` keys -> (model key, shape)."""
  size, patch = vit_variants.decode_variant(decode(variant)[0])
  width, hidden = size.width, size.mlp_dim
  layout = {
      _HF + "embeddings.patch_embedding.weight": ("embedding/kernel", (width, 3, patch, patch)),
      _HF + "embeddings.patch_embedding.bias": ("embedding/bias", (width,)),
      _HF + "embeddings.position_embedding.weight": (_POSEMB, (-1, width)),
      _HF + "post_layernorm.weight": ("Transformer/encoder_norm/scale", (width,)),
      _HF + "post_layernorm.bias": ("Transformer/encoder_norm/bias", (width,)),
      _HF + "head.probe": ("MAPHead_0/probe", (1, 1, width)),
  }
  for i in range(size.depth):
    theirs, ours = f"{_HF}encoder.layers.{i}.", f"Transformer/encoderblock_{i}/"
    layout[theirs + "layer_norm1.weight"] = (ours + "LayerNorm_0/scale", (width,))
    layout[theirs + "layer_norm1.bias"] = (ours + "LayerNorm_0/bias", (width,))
    layout.update(_attention(theirs + "self_attn.", ours + "MultiHeadDotProductAttention_0/",
                             False, width))
    layout.update(_pre_ln_mlp(theirs, ours, "layer_norm2", "LayerNorm_1", width, hidden))
  layout.update(_attention(_HF + "head.attention.", "MAPHead_0/MultiHeadDotProductAttention_0/",
                           True, width))
  layout.update(_pre_ln_mlp(_HF + "head.", "MAPHead_0/", "layernorm", "LayerNorm_0", width,
                            hidden))
  return layout


def convert_torch(state_dict: Mapping[str, Any], variant: str) -> dict[str, np.ndarray]:
  """transformers' SigLIP state dict (``vision_model.*``, or a bare vision tower's
  ``embeddings.*``/``encoder.*``/``head.*``; the text tower and
  ``logit_scale``/``logit_bias`` are dropped) -> the model's flat keys (strict)."""
  # A bare SiglipVisionTransformer's state dict has no "vision_model." prefix.
  arrays = tower_family.tower_state(state_dict, _HF,
                                    bare_key="embeddings.patch_embedding.weight")
  return torch_vit_layout.checked_conversion(
      arrays, _hf_layout(variant), variant, tower_family.size_of(variant, decode), _HINT)


# partial-k also trains what follows the blocks: the final norm and the MAP head.
FAMILIES = {"siglip": tower_family.make_family(
    "siglip", decode, convert_torch, final_norm=r"(Transformer/encoder_norm|MAPHead_0)/.*",
    convert_npz=convert_npz)}
