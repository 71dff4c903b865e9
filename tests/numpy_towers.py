"""NumPy float64 forwards of DINOv2, CLIP and SigLIP image towers, read straight
from the official state dicts (their own key names and (out, in) layouts).

Written from the official code (facebookresearch/dinov2 ``vision_transformer``
and ``layers``; openai/CLIP ``model.VisionTransformer``; transformers'
``SiglipVisionTransformer``), sharing nothing with the Flax model but the
math: prompts (p, D) enter where each family puts them.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special


def _f(state):
  return {k: np.asarray(v, np.float64) for k, v in state.items()}


def layer_norm(x, weight, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x):
  return 0.5 * x * (1 + scipy.special.erf(x / math.sqrt(2)))


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def quick_gelu(x):
  return x / (1 + np.exp(-1.702 * x))


def linear(x, s, name):
  """torch.nn.Linear: x @ W.T + b with W (out, in)."""
  return x @ s[name + ".weight"].T + s.get(name + ".bias", 0.0)


def attention(q_in, kv_in, wq, bq, wk, bk, wv, bv, wo, bo, heads):
  """Multi-head attention with (out, in) weights; (B, Tq, D), (B, Tk, D) -> (B, Tq, D)."""
  b, tq, d = q_in.shape
  split = lambda x: x.reshape(b, x.shape[1], heads, d // heads).transpose(0, 2, 1, 3)
  q, k, v = split(q_in @ wq.T + bq), split(kv_in @ wk.T + bk), split(kv_in @ wv.T + bv)
  scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
  scores = np.exp(scores - scores.max(-1, keepdims=True))
  mixed = (scores / scores.sum(-1, keepdims=True)) @ v
  return mixed.transpose(0, 2, 1, 3).reshape(b, tq, d) @ wo.T + bo


def fused_attention(x, w, b, wo, bo, heads, kv=None):
  """Attention from a fused (3D, D) in-projection (timm qkv, torch in_proj)."""
  d = x.shape[-1]
  kv = x if kv is None else kv
  return attention(x, kv, w[:d], b[:d], w[d:2 * d], b[d:2 * d], w[2 * d:], b[2 * d:], wo, bo,
                   heads)


def conv_patches(images, weight, bias=None):
  """Patch convolution, torch weight (D, 3, P, P), NHWC images -> (B, N, D) row-major."""
  b, h, w, c = images.shape
  p = weight.shape[-1]
  patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  tokens = patches.reshape(b, (h // p) * (w // p), c * p * p) @ weight.reshape(
      weight.shape[0], -1).T
  return tokens + (0.0 if bias is None else bias)


# ---------------------------------------------------------------------------
# torch.nn.functional.interpolate(mode="bicubic", align_corners=False), 1-D.


def _keys(t, a):
  t = abs(t)
  if t <= 1:
    return ((a + 2) * t - (a + 3)) * t * t + 1
  if t < 2:
    return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
  return 0.0


def resize_axis(values, out_size, scale_factor=None, antialias=False):
  """values (..., n) resized along the last axis as torch's bicubic does."""
  n = values.shape[-1]
  scale = 1 / scale_factor if scale_factor else n / out_size
  out = np.zeros(values.shape[:-1] + (out_size,))
  for i in range(out_size):
    if antialias:  # PIL-style: a = -0.5, support widened when shrinking, renormalised
      support = 2 * scale if scale >= 1 else 2
      centre, inv = scale * (i + 0.5), (1 / scale if scale >= 1 else 1)
      lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n)
      taps = [(j, _keys((j - centre + 0.5) * inv, -0.5)) for j in range(lo, hi)]
      total = sum(w for _, w in taps)
      taps = [(j, w / total) for j, w in taps]
    else:  # a = -0.75, borders replicated
      src = (i + 0.5) * scale - 0.5
      base = math.floor(src)
      taps = [(min(max(base + k, 0), n - 1), _keys(src - base - k, -0.75)) for k in range(-1, 3)]
    for j, w in taps:
      out[..., i] += w * values[..., j]
  return out


def dinov2_posemb(pos_embed, grid, offset, antialias):
  """DINOv2's interpolate_pos_encoding for a square grid: (1, 1+M^2, D) -> (1, 1+g^2, D)."""
  m = math.isqrt(pos_embed.shape[1] - 1)
  if grid == m:
    return pos_embed
  table = pos_embed[0, 1:].reshape(m, m, -1).transpose(2, 0, 1)  # (D, M, M)
  factor = (grid + offset) / m if offset else None
  table = resize_axis(table, grid, factor, antialias)  # columns
  table = resize_axis(table.transpose(0, 2, 1), grid, factor, antialias).transpose(0, 2, 1)
  patches = table.transpose(1, 2, 0).reshape(1, grid * grid, -1)  # (rows, cols, D) row-major
  return np.concatenate([pos_embed[:, :1], patches], axis=1)


def dinov2_features(state, images, *, heads, offset, antialias, prompts=None):
  """x_norm_clstoken of a DINOv2 state dict; prompts (p, D) after CLS and registers."""
  s, x = _f(state), np.asarray(images, np.float64)
  tokens = conv_patches(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"])
  b, n, d = tokens.shape
  tokens = np.concatenate([np.broadcast_to(s["cls_token"], (b, 1, d)), tokens], 1)
  tokens = tokens + dinov2_posemb(s["pos_embed"], math.isqrt(n), offset, antialias)
  extra = [s["register_tokens"][0]] if "register_tokens" in s else []
  extra += [prompts] if prompts is not None else []
  if extra:
    rows = np.concatenate(extra, 0)
    tokens = np.concatenate([tokens[:, :1], np.broadcast_to(rows, (b,) + rows.shape),
                             tokens[:, 1:]], 1)
  i = 0
  while f"blocks.{i}.norm1.weight" in s:
    p = f"blocks.{i}."
    y = layer_norm(tokens, s[p + "norm1.weight"], s[p + "norm1.bias"], 1e-6)
    y = fused_attention(y, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"],
                        s[p + "attn.proj.weight"], s[p + "attn.proj.bias"], heads)
    tokens = tokens + s[p + "ls1.gamma"] * y
    y = layer_norm(tokens, s[p + "norm2.weight"], s[p + "norm2.bias"], 1e-6)
    if p + "mlp.w12.weight" in s:  # SwiGLU: silu(x1) * x2 from the fused w12
      x12 = linear(y, s, p + "mlp.w12")
      x1, x2 = np.split(x12, 2, axis=-1)
      y = linear(x1 / (1 + np.exp(-x1)) * x2, s, p + "mlp.w3")
    else:
      y = linear(gelu(linear(y, s, p + "mlp.fc1")), s, p + "mlp.fc2")
    tokens = tokens + s[p + "ls2.gamma"] * y
    i += 1
  return layer_norm(tokens, s["norm.weight"], s["norm.bias"], 1e-6)[:, 0]


def clip_features(state, images, *, heads, quick=True, prompts=None):
  """openai/CLIP VisionTransformer.forward from ``visual.*`` keys: ln_post(CLS) @ proj.

  ``prompts`` (p, D) are inserted after CLS, after ln_pre (VPT's placement).
  """
  s = {k[len("visual."):]: v for k, v in _f(state).items() if k.startswith("visual.")}
  x = conv_patches(np.asarray(images, np.float64), s["conv1.weight"])
  b, _, d = x.shape
  x = np.concatenate([np.broadcast_to(s["class_embedding"], (b, 1, d)), x], 1)
  x = layer_norm(x + s["positional_embedding"], s["ln_pre.weight"], s["ln_pre.bias"], 1e-5)
  if prompts is not None:
    x = np.concatenate([x[:, :1], np.broadcast_to(prompts, (b,) + prompts.shape), x[:, 1:]], 1)
  act = quick_gelu if quick else gelu
  i = 0
  while f"transformer.resblocks.{i}.ln_1.weight" in s:
    p = f"transformer.resblocks.{i}."
    y = layer_norm(x, s[p + "ln_1.weight"], s[p + "ln_1.bias"], 1e-5)
    x = x + fused_attention(y, s[p + "attn.in_proj_weight"], s[p + "attn.in_proj_bias"],
                            s[p + "attn.out_proj.weight"], s[p + "attn.out_proj.bias"], heads)
    y = layer_norm(x, s[p + "ln_2.weight"], s[p + "ln_2.bias"], 1e-5)
    x = x + linear(act(linear(y, s, p + "mlp.c_fc")), s, p + "mlp.c_proj")
    i += 1
  return layer_norm(x[:, 0], s["ln_post.weight"], s["ln_post.bias"], 1e-5) @ s["proj"]


def siglip_features(state, images, *, heads, prompts=None, map_reads_prompts=True):
  """transformers' SiglipVisionTransformer (+ MAP head) from ``vision_model.*`` keys.

  ``prompts`` (p, D) go before the patches (no CLS); the MAP probe reads them
  only if ``map_reads_prompts``.
  """
  s = {k[len("vision_model."):]: v for k, v in _f(state).items()
       if k.startswith("vision_model.")}
  x = conv_patches(np.asarray(images, np.float64), s["embeddings.patch_embedding.weight"],
                   s["embeddings.patch_embedding.bias"])
  x = x + s["embeddings.position_embedding.weight"]
  b, _, d = x.shape
  num_prompts = 0 if prompts is None else prompts.shape[0]
  if prompts is not None:
    x = np.concatenate([np.broadcast_to(prompts, (b,) + prompts.shape), x], 1)
  i = 0
  while f"encoder.layers.{i}.layer_norm1.weight" in s:
    p = f"encoder.layers.{i}."
    y = layer_norm(x, s[p + "layer_norm1.weight"], s[p + "layer_norm1.bias"], 1e-6)
    a = p + "self_attn."
    x = x + attention(y, y, *(s[f"{a}{n}_proj.{w}"] for n in "qkv" for w in ("weight", "bias")),
                      s[a + "out_proj.weight"], s[a + "out_proj.bias"], heads)
    y = layer_norm(x, s[p + "layer_norm2.weight"], s[p + "layer_norm2.bias"], 1e-6)
    x = x + linear(gelu_tanh(linear(y, s, p + "mlp.fc1")), s, p + "mlp.fc2")
    i += 1
  x = layer_norm(x, s["post_layernorm.weight"], s["post_layernorm.bias"], 1e-6)
  if not map_reads_prompts:
    x = x[:, num_prompts:]
  h = "head."
  probe = np.broadcast_to(s[h + "probe"], (b, 1, d))
  y = fused_attention(probe, s[h + "attention.in_proj_weight"], s[h + "attention.in_proj_bias"],
                      s[h + "attention.out_proj.weight"], s[h + "attention.out_proj.bias"],
                      heads, kv=x)
  z = layer_norm(y, s[h + "layernorm.weight"], s[h + "layernorm.bias"], 1e-6)
  return (y + linear(gelu_tanh(linear(z, s, h + "mlp.fc1")), s, h + "mlp.fc2"))[:, 0]
