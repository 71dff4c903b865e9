"""CLIP's text tower as a pure function of the checkpoint's text arrays.

Follows openai/CLIP ``clip/model.py`` (``CLIP.encode_text``, ``Transformer``,
``ResidualAttentionBlock``), which open_clip's ``CLIP`` keeps key for key:

    x = token_embedding[tokens] + positional_embedding          (B, L, W)
    for each block i (pre-LN, causal self-attention):
      x = x + out_proj(attention(ln_1(x)), mask: token t sees tokens <= t)
      x = x + c_proj(act(c_fc(ln_2(x))))      act: QuickGELU x * sigmoid(1.702 x)
    x = ln_final(x)                                               (LayerNorm eps 1e-5)
    embedding = x[b, argmax_t tokens[b, t]] @ text_projection     (B, E)

The pooled token is the end-of-text token, the highest id of CLIP's vocabulary
(hence the argmax). Attention has ``width // 64`` heads in every released CLIP
(``build_model``: ``transformer_heads = transformer_width // 64``). OpenAI's
checkpoints use QuickGELU; most open_clip (LAION) text towers use exact GELU
(``activation="gelu"``).

Arrays keep their PyTorch names and layouts: ``nn.Linear`` weights are
(out, in), ``attn.in_proj_weight`` is the fused (3W, W) query/key/value
projection, ``text_projection`` is (W, E) and used as ``x @ text_projection``.
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax import errors
from vpt_jax.models import attention_kernels
from vpt_jax.models import vit_options

LAYER_NORM_EPSILON = 1e-5
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")  # vit_options.activate computes each
POOLS = ("end_token", "last")
# Per-block arrays, under "transformer.resblocks.{i}.".
BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
              "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
              "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
TOP_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight",
            "ln_final.bias", "text_projection")
BLOCK_PREFIX = "transformer.resblocks."
SCALARS = ("logit_scale", "logit_bias")


class TextTowerError(errors.UserError):
  """A checkpoint whose text arrays are missing or misshapen."""


def text_arrays(flat: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """The text tower's arrays of a CLIP state dict (``visual.*`` and others dropped).

  Checks every key of every block is present with CLIP's shapes; the error
  names the first missing or misshapen key and the file.
  """
  layers = sorted({int(m.group(1)) for key in flat
                   for m in [re.match(rf"{re.escape(BLOCK_PREFIX)}(\d+)\.", key)] if m})
  expected = list(TOP_KEYS) + [f"{BLOCK_PREFIX}{i}.{k}" for i in layers for k in BLOCK_KEYS]
  missing = [key for key in expected if key not in flat]
  if missing or not layers:
    raise TextTowerError(
        f"{source} lacks the CLIP text tower's {missing[0] if missing else BLOCK_PREFIX + '0.*'!r}"
        "; pass an OpenAI CLIP or open_clip checkpoint (state dict with the text keys) "
        "as --config.head.text_checkpoint")
  arrays = {key: np.asarray(flat[key], np.float32) for key in expected}
  width = arrays["token_embedding.weight"].shape[1]
  shapes = {"positional_embedding": (None, width), "ln_final.weight": (width,),
            "text_projection": (width, None)}
  for i in layers:
    p = f"{BLOCK_PREFIX}{i}."
    shapes.update({p + "attn.in_proj_weight": (3 * width, width),
                   p + "attn.out_proj.weight": (width, width),
                   p + "mlp.c_fc.weight": (None, width), p + "mlp.c_proj.weight": (width, None)})
  for key, shape in shapes.items():
    actual = arrays[key].shape
    if len(actual) != len(shape) or any(s is not None and s != a for s, a in zip(shape, actual)):
      raise TextTowerError(f"{source}: {key} has shape {actual}, but a text tower of width "
                           f"{width} needs {shape} (None: any); the file is not a CLIP "
                           "checkpoint or is damaged")
  for key in SCALARS:  # SigLIP (siglip_text) also has a logit bias
    if key in flat:
      arrays[key] = np.asarray(flat[key], np.float32).reshape(())
  if "text_projection_bias" in flat:  # SigLIP's text head is a Linear with a bias
    arrays["text_projection_bias"] = np.asarray(flat["text_projection_bias"], np.float32)
  return arrays


def num_layers(arrays: Mapping[str, np.ndarray]) -> int:
  return sum(key.startswith(BLOCK_PREFIX) and key.endswith(".ln_1.weight") for key in arrays)


def _layer_norm(x, weight, bias, epsilon):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + epsilon) * weight + bias


def _attention(x, p: Mapping, num_heads: int, causal: bool):
  """(Causal) multi-head self-attention of (B, L, W) as torch's nn.MultiheadAttention."""
  batch, length, width = x.shape
  qkv = x @ p["attn.in_proj_weight"].T + p["attn.in_proj_bias"]
  q, k, v = (t.reshape(batch, length, num_heads, width // num_heads)
             for t in jnp.split(qkv, 3, axis=-1))
  # Causal: token t sees tokens <= t (an additive -inf bias on the logits above the diagonal).
  bias = (jnp.where(np.tril(np.ones((1, 1, length, length), bool)), 0.0, -jnp.inf)
          if causal else None)
  out = attention_kernels.attend(q, k, v, bias=bias).reshape(batch, length, width)
  return out @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]


def encode_text(arrays: Mapping[str, jax.Array], tokens: jax.Array, *, num_heads: int = 0,
                activation: str = "quick_gelu", causal: bool = True, pool: str = "end_token",
                epsilon: float = LAYER_NORM_EPSILON) -> jax.Array:
  """Text embeddings (B, E) of int tokens (B, L) (L = the positional embedding's length).

  ``num_heads`` 0 means ``width // 64`` (CLIP's rule). Unnormalised: CLIP
  normalises the embeddings where it compares them (``text_heads``). The
  defaults are CLIP's; SigLIP's tower (``siglip_text.OPTIONS``) attends to
  every token (``causal=False``), pools the last position and adds
  ``text_projection_bias``.
  """
  if activation not in ACTIVATIONS or pool not in POOLS:
    raise TextTowerError(f"Unknown text activation {activation!r} or pooling {pool!r}; "
                         f"choose from {ACTIVATIONS} and {POOLS}")
  width = arrays["token_embedding.weight"].shape[1]
  num_heads = num_heads or width // 64
  if not num_heads or width % num_heads:
    raise TextTowerError(f"{num_heads} attention heads do not divide the text width {width};"
                         " set --config.head.text_heads to a divisor of it")
  x = arrays["token_embedding.weight"][tokens] + arrays["positional_embedding"]
  for i in range(num_layers(arrays)):
    p = {k: arrays[f"{BLOCK_PREFIX}{i}.{k}"] for k in BLOCK_KEYS}
    h = _layer_norm(x, p["ln_1.weight"], p["ln_1.bias"], epsilon)
    x = x + _attention(h, p, num_heads, causal)
    h = _layer_norm(x, p["ln_2.weight"], p["ln_2.bias"], epsilon)
    h = vit_options.activate(h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"], activation)
    x = x + h @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]
  x = _layer_norm(x, arrays["ln_final.weight"], arrays["ln_final.bias"], epsilon)
  # CLIP: the end-of-text token, the highest id of its vocabulary; SigLIP: the last position.
  pooled = x[:, -1] if pool == "last" else x[jnp.arange(x.shape[0]), jnp.argmax(tokens, -1)]
  return pooled @ arrays["text_projection"] + arrays.get("text_projection_bias", 0.0)
