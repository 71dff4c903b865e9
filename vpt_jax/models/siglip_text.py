"""SigLIP's text tower (transformers' ``SiglipTextTransformer`` layout) in CLIP's names.

The tower is CLIP's (``clip_text.encode_text``) with SigLIP's ``OPTIONS``:
pre-LN blocks with LayerNorm eps 1e-6 and tanh-approximated GELU
(``gelu_pytorch_tanh``), attention over every position (no causal mask, and no
padding mask: SigLIP's texts are padded to the full length, 64), then
``final_layer_norm``, the LAST position's output, and ``head`` (a Linear with a
bias) as the projection. The zero-shot logit is
``exp(logit_scale) * cos(image, text) + logit_bias``.

``to_clip_names`` maps a ``SiglipModel`` state dict (``model.safetensors`` of
``google/siglip-*``: ``text_model.*``, ``logit_scale``, ``logit_bias``) to
``clip_text``'s names, fusing q/k/v into ``attn.in_proj_weight`` as torch's
``nn.MultiheadAttention`` stores them.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from vpt_jax.models import clip_text

PREFIX = "text_model."
OPTIONS = dict(activation="gelu_tanh", causal=False, pool="last", epsilon=1e-6)
# transformers' name -> clip_text's name, per block (under encoder.layers.{i}.).
BLOCK_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
TOP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
             "head.bias": "text_projection_bias"}


def is_siglip(flat: Mapping[str, np.ndarray]) -> bool:
  """Whether a state dict holds transformers' SigLIP text tower."""
  return PREFIX + "embeddings.token_embedding.weight" in flat


def to_clip_names(flat: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """The text arrays of a SigLIP state dict under ``clip_text``'s names (checked there)."""
  layers = sorted({int(m.group(1)) for key in flat
                   for m in [re.match(rf"{PREFIX}encoder\.layers\.(\d+)\.", key)] if m})
  block = [f"{t}.{n}" for t in [*BLOCK_NAMES, *(f"self_attn.{p}_proj" for p in "qkv")]
           for n in ("weight", "bias")]
  missing = [key for key in [PREFIX + k for k in (*TOP_NAMES, "head.weight")]
             + [f"{PREFIX}encoder.layers.{i}.{k}" for i in layers for k in block]
             if key not in flat]
  if missing or not layers:
    raise clip_text.TextTowerError(
        f"{source} lacks SigLIP's text {missing[0] if missing else 'encoder.layers.0.*'!r}; "
        "pass a transformers SigLIP checkpoint (google/siglip-*) or a CLIP one")
  # Every key below is present: the check above named each one.
  out = {ours: flat[PREFIX + theirs] for theirs, ours in TOP_NAMES.items()}
  out["text_projection"] = np.asarray(flat[PREFIX + "head.weight"]).T  # Linear (E, W) -> (W, E)
  out.update({key: flat[key] for key in clip_text.SCALARS if key in flat})
  for i in layers:
    theirs, ours = f"{PREFIX}encoder.layers.{i}.", f"{clip_text.BLOCK_PREFIX}{i}."
    for name in ("weight", "bias"):
      for t, o in BLOCK_NAMES.items():
        out[f"{ours}{o}.{name}"] = flat[f"{theirs}{t}.{name}"]
      out[f"{ours}attn.in_proj_{name}"] = np.concatenate(
          [flat[f"{theirs}self_attn.{p}_proj.{name}"] for p in "qkv"])
  return clip_text.text_arrays(out, f"{source} (SigLIP text_model.*)")
