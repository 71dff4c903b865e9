"""Float64 NumPy ViT forward with the re-parameterisable methods, written from their official code.

Independent of the Flax hooks: each method is applied where its official
repository applies it, in that code's own formulation:
  * SSF (dongzelian/SSF ``ssf_ada``): ``y * scale + shift`` after the patch
    embedding, norm1/norm2, the fused qkv (here the three projections), proj,
    fc1, fc2 and the final norm;
  * DiffFit (OSU ViT_PEFT_Vision ``block.py``): x = gamma1 * attn + x,
    x = gamma2 * mlp + x;
  * FacT (JieShibo/PETL-ViT ``fact_tt.py`` / ``fact_tk.py``, eval mode):
    qkv += cat([v(s_q(u x)), ...]) * s, proj += v(s_o(u x)) * s,
    fc1 += v((s_1(u x)).reshape(4, r)).reshape(4D) * s,
    fc2 += v(s_2(u(h.reshape(4, D)).reshape(4r))) * s; TK's per-layer cores
    are ``FacTc @ FacTp[:, idx:idx + 4 / 8]`` with idx = 12 l resp. 12 l + 4;
  * RepAdapter (luogen1996/RepAdapter ``RepAdapter.forward``, eval mode):
    x -> conv_B(conv_A(x)) * s + x before attn and before mlp, conv_B grouped.
"""

from __future__ import annotations

import math

import numpy as np

import numpy_vit
from numpy_vit import gelu, layer_norm, softmax


def _ssf(y, params, name):
  """``ssf_ada``: y * scale + shift when the method has this operation's pair."""
  pair = params.get(f"ssf_{name}")
  if pair is None:
    return y
  return y * pair["scale"].reshape(-1) + pair["shift"].reshape(-1)


_FACT_NAMES = {"q": "query", "k": "key", "v": "value", "out": "out", "fc1": "Dense_0",
               "fc2": "Dense_1"}


def fact_cores(fact, layer, ratio):
  """The layer's FacT cores as the official code builds them (kernels: in -> out).

  The official code has ratio (mlp_dim / D) 4, so 12 FacTp columns per layer.
  """
  if "c" not in fact:  # TT: per-layer Linear(r, r) / (r, 4r) / (4r, r)
    return {short: fact[name][layer] for short, name in _FACT_NAMES.items()}
  rank, columns = fact["c"].shape[0], 4 + 2 * ratio
  idx = columns * layer
  attention = fact["c"] @ fact["p"][:, idx:idx + 4]
  mlp = fact["c"] @ fact["p"][:, idx + 4:idx + columns]
  return {"q": attention[:, :, 0], "k": attention[:, :, 1], "v": attention[:, :, 2],
          "out": attention[:, :, 3], "fc1": mlp[:, :, :ratio].reshape(rank, ratio * rank),
          "fc2": mlp[:, :, ratio:].reshape(rank, ratio * rank).T}


def _repadapter(x, adapter, scale):
  """conv_B(conv_A(x)) * scale + x; conv_B groups = its kernel's leading axis."""
  if adapter is None:
    return x
  groups, hidden_per_group, out_per_group = adapter["up"]["kernel"].shape
  dense = np.zeros((groups * hidden_per_group, groups * out_per_group))
  for g in range(groups):
    dense[g * hidden_per_group:(g + 1) * hidden_per_group,
          g * out_per_group:(g + 1) * out_per_group] = adapter["up"]["kernel"][g]
  hidden = x @ adapter["down"]["kernel"] + adapter["down"]["bias"]
  return (hidden @ dense + adapter["up"]["bias"]) * scale + x


def _attention(y, attn, fact, cores, fact_scale):
  """timm Attention with a fused qkv, SSF and FacT as the official forwards."""
  batch, tokens, width = y.shape
  weights = [attn[n]["kernel"].reshape(width, width) for n in ("query", "key", "value")]
  biases = [attn[n]["bias"].reshape(width) for n in ("query", "key", "value")]
  parts = []
  for name, weight, bias in zip(("query", "key", "value"), weights, biases):
    part = y @ weight + bias
    if fact is not None:
      short = {"query": "q", "key": "k", "value": "v"}[name]
      part = part + ((y @ fact["u"]) @ cores[short]) @ fact["v"] * fact_scale
    parts.append(_ssf(part, attn, name))
  heads = attn["query"]["kernel"].shape[1]
  q, k, v = (p.reshape(batch, tokens, heads, width // heads) for p in parts)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // heads)
  mixed = np.einsum("bhqk,bkhd->bqhd", softmax(scores), v).reshape(batch, tokens, width)
  out = mixed @ attn["out"]["kernel"].reshape(width, width) + attn["out"]["bias"]
  if fact is not None:
    out = out + ((mixed @ fact["u"]) @ cores["out"]) @ fact["v"] * fact_scale
  return _ssf(out, attn, "out")


def _mlp(y, mlp, fact, cores, fact_scale):
  batch, tokens, width = y.shape
  h = y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"]
  if fact is not None:
    rank = fact["u"].shape[1]
    low = ((y @ fact["u"]) @ cores["fc1"]).reshape(batch, tokens, -1, rank)
    h = h + (low @ fact["v"]).reshape(batch, tokens, -1) * fact_scale
  h = gelu(_ssf(h, mlp, "Dense_0"))
  out = h @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
  if fact is not None:
    low = (h.reshape(batch, tokens, -1, width) @ fact["u"]).reshape(batch, tokens, -1)
    out = out + (low @ cores["fc2"]) @ fact["v"] * fact_scale
  return _ssf(out, mlp, "Dense_1")


def _block(x, params, fact, cores, fact_scale, repadapter_scale):
  y = _ssf(layer_norm(x, params["LayerNorm_0"]["scale"], params["LayerNorm_0"]["bias"]),
           params, "LayerNorm_0")
  y = _repadapter(y, params.get("repadapter_attention"), repadapter_scale)
  branch = _attention(y, params["MultiHeadDotProductAttention_0"], fact, cores, fact_scale)
  x = x + params.get("difffit_attention", {}).get("gamma", 1.0) * branch
  y = _ssf(layer_norm(x, params["LayerNorm_1"]["scale"], params["LayerNorm_1"]["bias"]),
           params, "LayerNorm_1")
  y = _repadapter(y, params.get("repadapter_mlp"), repadapter_scale)
  branch = _mlp(y, params["MlpBlock_0"], fact, cores, fact_scale)
  return x + params.get("difffit_mlp", {}).get("gamma", 1.0) * branch


def vit_forward(params, images, *, fact_scale=1.0, repadapter_scale=1.0):
  """Logits (B, C) of the CLS-pooled ViT with the methods' parameters found in ``params``."""
  params = numpy_vit._f64(params)  # pylint: disable=protected-access
  images = np.asarray(images, np.float64)
  transformer = params["Transformer"]
  x = numpy_vit.patch_embed(images, params["embedding"]["kernel"], params["embedding"]["bias"])
  x = _ssf(x, params, "embedding")
  cls = np.broadcast_to(params["cls"], (x.shape[0], 1, x.shape[2]))
  x = np.concatenate([cls, x], axis=1) + transformer["posembed_input"]["pos_embedding"]
  fact = params.get("fact")
  depth = sum(1 for name in transformer if name.startswith("encoderblock_"))
  for layer in range(depth):
    block = transformer[f"encoderblock_{layer}"]
    ratio = block["MlpBlock_0"]["Dense_0"]["kernel"].shape[1] // x.shape[2]
    cores = fact_cores(fact, layer, ratio) if fact is not None else None
    x = _block(x, block, fact, cores, fact_scale, repadapter_scale)
  norm = transformer["encoder_norm"]
  tokens = _ssf(layer_norm(x, norm["scale"], norm["bias"]), transformer, "encoder_norm")
  return tokens[:, 0] @ params["head"]["kernel"] + params["head"]["bias"]
