"""Reference Swin + VPT forward in NumPy float64, and official state dicts by hand.

The yardstick for ``vpt_jax.models.swin``. The NumPy model follows the
reference's PyTorch code step by step (torch layout weights, ``x @ W.T``,
windows of all images flattened image-major into one axis, prompt copies
expanded window-major, prompt outputs averaged with ``view(-1, B, P, C).mean(0)``),
with the mask regions, the relative position index and the GELU written out
independently of ``vpt_jax.models``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special


# The tiny sizes of vpt_jax.models.swin (written out: the test's own expectation).
TINY = {
    "swin-test/4w2": dict(embed=16, depths=(2, 2), heads=(2, 4), patch=4, window=2),
    "swin-test3/4w2": dict(embed=8, depths=(2, 2, 2), heads=(1, 2, 4), patch=4, window=2),
}
EPS = 1e-5


# ---------------------------------------------------------------------------
# The official state dict, by hand.


def official_state_dict(variant: str, seed: int = 0, head_classes: int = 7) -> dict:
  """Random weights under microsoft/Swin-Transformer's names and (torch) shapes."""
  cfg = TINY[variant]
  rng = np.random.default_rng(seed)
  c, p, w = cfg["embed"], cfg["patch"], cfg["window"]
  normal = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)
  linear = lambda out, inp: normal(out, inp, scale=1.0 / math.sqrt(inp))
  sd = {
      "patch_embed.proj.weight": normal(c, 3, p, p, scale=0.3),
      "patch_embed.proj.bias": normal(c, scale=0.1),
      "patch_embed.norm.weight": 1 + normal(c, scale=0.1),
      "patch_embed.norm.bias": normal(c, scale=0.1),
  }
  num_stages = len(cfg["depths"])
  for s, (depth, heads) in enumerate(zip(cfg["depths"], cfg["heads"])):
    dim = c * 2 ** s
    for i in range(depth):
      b = f"layers.{s}.blocks.{i}."
      sd[b + "norm1.weight"] = 1 + normal(dim, scale=0.1)
      sd[b + "norm1.bias"] = normal(dim, scale=0.1)
      sd[b + "attn.relative_position_bias_table"] = normal((2 * w - 1) ** 2, heads)
      sd[b + "attn.qkv.weight"] = linear(3 * dim, dim)
      sd[b + "attn.qkv.bias"] = normal(3 * dim, scale=0.1)
      sd[b + "attn.proj.weight"] = linear(dim, dim)
      sd[b + "attn.proj.bias"] = normal(dim, scale=0.1)
      sd[b + "norm2.weight"] = 1 + normal(dim, scale=0.1)
      sd[b + "norm2.bias"] = normal(dim, scale=0.1)
      sd[b + "mlp.fc1.weight"] = linear(4 * dim, dim)
      sd[b + "mlp.fc1.bias"] = normal(4 * dim, scale=0.1)
      sd[b + "mlp.fc2.weight"] = linear(dim, 4 * dim)
      sd[b + "mlp.fc2.bias"] = normal(dim, scale=0.1)
      # Buffers the official files contain (values irrelevant to the loader).
      sd[b + "attn.relative_position_index"] = np.zeros((w * w, w * w), np.int64)
      if i % 2:
        sd[b + "attn_mask"] = np.zeros((4, w * w, w * w), np.float32)
    if s < num_stages - 1:
      sd[f"layers.{s}.downsample.reduction.weight"] = linear(2 * dim, 4 * dim)
      sd[f"layers.{s}.downsample.norm.weight"] = 1 + normal(4 * dim, scale=0.1)
      sd[f"layers.{s}.downsample.norm.bias"] = normal(4 * dim, scale=0.1)
  last = c * 2 ** (num_stages - 1)
  sd["norm.weight"] = 1 + normal(last, scale=0.1)
  sd["norm.bias"] = normal(last, scale=0.1)
  sd["head.weight"] = normal(head_classes, last)
  sd["head.bias"] = normal(head_classes)
  return sd


def random_prompts(variant: str, num_prompts: int, deep: bool, seed: int = 1) -> dict:
  """Prompt sets under our names: shallow (P, C); deep_0 (d0 - 1, P, C), deep_s (d_s, P, C_s)."""
  cfg = TINY[variant]
  rng = np.random.default_rng(seed)
  uniform = lambda *shape: rng.uniform(-1, 1, shape).astype(np.float32)
  prompts = {"shallow": uniform(num_prompts, cfg["embed"])}
  if deep:
    for s, depth in enumerate(cfg["depths"]):
      prompts[f"deep_{s}"] = uniform(depth - (s == 0), num_prompts, cfg["embed"] * 2 ** s)
  return prompts


# ---------------------------------------------------------------------------
# The NumPy Swin (the reference's PyTorch code, transcribed).


def np_layer_norm(x, weight, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPS) * weight + bias


def np_linear(x, weight, bias=None):
  y = x @ weight.T
  return y if bias is None else y + bias


def np_gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_partition(x, ws):
  """torch window_partition: (B, H, W, C) -> (B * nW, ws * ws, C), image-major."""
  b, h, w, c = x.shape
  out = []
  for image in range(b):
    for row in range(h // ws):
      for col in range(w // ws):
        out.append(x[image, row * ws:(row + 1) * ws, col * ws:(col + 1) * ws].reshape(-1, c))
  return np.stack(out)


def np_reverse(windows, ws, h, w):
  nw = (h // ws) * (w // ws)
  b, c = windows.shape[0] // nw, windows.shape[-1]
  x = np.zeros((b, h, w, c), windows.dtype)
  k = 0
  for image in range(b):
    for row in range(h // ws):
      for col in range(w // ws):
        x[image, row * ws:(row + 1) * ws, col * ws:(col + 1) * ws] = windows[k].reshape(ws, ws, c)
        k += 1
  return x


def np_relative_index(ws):
  n = ws * ws
  index = np.zeros((n, n), np.int64)
  for i in range(n):
    for j in range(n):
      dy = i // ws - j // ws + ws - 1
      dx = i % ws - j % ws + ws - 1
      index[i, j] = dy * (2 * ws - 1) + dx
  return index


def np_shift_mask(res, ws, shift):
  """(nW, n, n): -100 between tokens of different regions of the shifted map."""
  region = lambda c: 0 if c < res - ws else (1 if c < res - shift else 2)
  labels = np.array([[3 * region(y) + region(x) for x in range(res)] for y in range(res)],
                    np.float32)
  windows = np_partition(labels[None, :, :, None], ws)[:, :, 0]
  return np.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0)


def np_attention(xw, sd, prefix, heads, ws, num_prompts, mask):
  bn, n, c = xw.shape
  hd = c // heads
  qkv = np_linear(xw, sd[prefix + "qkv.weight"], sd[prefix + "qkv.bias"])
  qkv = qkv.reshape(bn, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
  attn = q @ k.transpose(0, 1, 3, 2)
  table = sd[prefix + "relative_position_bias_table"]
  bias = table[np_relative_index(ws).reshape(-1)].reshape(ws * ws, ws * ws, heads)
  bias = bias.transpose(2, 0, 1)
  padded = np.zeros((heads, n, n))
  padded[:, num_prompts:, num_prompts:] = bias
  attn = attn + padded[None]
  if mask is not None:
    nw = mask.shape[0]
    full = np.zeros((nw, n, n))
    full[:, num_prompts:, num_prompts:] = mask
    attn = (attn.reshape(bn // nw, nw, heads, n, n) + full[None, :, None]).reshape(bn, heads, n, n)
  out = (np_softmax(attn) @ v).transpose(0, 2, 1, 3).reshape(bn, n, c)
  return np_linear(out, sd[prefix + "proj.weight"], sd[prefix + "proj.bias"])


def np_block(x, sd, prefix, res, heads, ws, shift, num_prompts):
  b, _, c = x.shape
  shortcut = x
  x = np_layer_norm(x, sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"])
  prompt = x[:, :num_prompts]
  image = x[:, num_prompts:].reshape(b, res, res, c)
  if shift:
    image = np.roll(image, (-shift, -shift), axis=(1, 2))
  windows = np_partition(image, ws)
  nw = windows.shape[0] // b
  if num_prompts:
    # prompt_emb.unsqueeze(0).expand(nW, -1, -1, -1).reshape(-1, P, C)
    expanded = np.broadcast_to(prompt[None], (nw, b, num_prompts, c)).reshape(-1, num_prompts, c)
    windows = np.concatenate([expanded, windows], axis=1)
  mask = np_shift_mask(res, ws, shift) if shift else None
  out = np_attention(windows, sd, prefix + "attn.", heads, ws, num_prompts, mask)
  if num_prompts:
    prompt = out[:, :num_prompts].reshape(-1, b, num_prompts, c).mean(0)
    out = out[:, num_prompts:]
  image = np_reverse(out, ws, res, res)
  if shift:
    image = np.roll(image, (shift, shift), axis=(1, 2))
  x = image.reshape(b, res * res, c)
  if num_prompts:
    x = np.concatenate([prompt, x], axis=1)
  x = shortcut + x
  h = np_layer_norm(x, sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"])
  h = np_linear(np_gelu(np_linear(h, sd[prefix + "mlp.fc1.weight"], sd[prefix + "mlp.fc1.bias"])),
                sd[prefix + "mlp.fc2.weight"], sd[prefix + "mlp.fc2.bias"])
  return x + h


def np_merge(x, sd, prefix, res, num_prompts):
  b, _, c = x.shape
  prompt = x[:, :num_prompts]
  image = x[:, num_prompts:].reshape(b, res, res, c)
  x0, x1 = image[:, 0::2, 0::2], image[:, 1::2, 0::2]
  x2, x3 = image[:, 0::2, 1::2], image[:, 1::2, 1::2]
  merged = np.concatenate([x0, x1, x2, x3], -1).reshape(b, -1, 4 * c)
  if num_prompts:
    merged = np.concatenate([np.concatenate([prompt] * 4, -1), merged], axis=1)
  merged = np_layer_norm(merged, sd[prefix + "norm.weight"], sd[prefix + "norm.bias"])
  return np_linear(merged, sd[prefix + "reduction.weight"])


def np_swin_features(images, sd, variant, prompts=None, deep=False):
  """Pooled features (B, C_last) of the reference's (prompted) Swin in eval mode."""
  cfg = TINY[variant]
  p, ws_cfg = cfg["patch"], cfg["window"]
  b, h, _, _ = images.shape
  res = h // p
  patches = images.reshape(b, res, p, res, p, 3)
  x = np.einsum("byrxsi,oirs->byxo", patches, sd["patch_embed.proj.weight"])
  x = x + sd["patch_embed.proj.bias"]
  x = x.reshape(b, res * res, -1)
  x = np_layer_norm(x, sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
  num_prompts = 0
  if prompts is not None:
    num_prompts = prompts["shallow"].shape[0]
    x = np.concatenate([np.broadcast_to(prompts["shallow"], (b,) + prompts["shallow"].shape),
                        x], axis=1)
  num_stages = len(cfg["depths"])
  for s, (depth, heads) in enumerate(zip(cfg["depths"], cfg["heads"])):
    for i in range(depth):
      if deep and (s > 0 or i > 0):
        sets = prompts[f"deep_{s}"]
        new = sets[i - 1] if s == 0 else sets[i]
        x = np.concatenate([np.broadcast_to(new, (b,) + new.shape), x[:, num_prompts:]], axis=1)
      ws, shift = ws_cfg, (0 if i % 2 == 0 else ws_cfg // 2)
      if res <= ws:
        ws, shift = res, 0
      x = np_block(x, sd, f"layers.{s}.blocks.{i}.", res, heads, ws, shift, num_prompts)
    if s < num_stages - 1:
      x = np_merge(x, sd, f"layers.{s}.downsample.", res, num_prompts)
      res //= 2
  x = np_layer_norm(x, sd["norm.weight"], sd["norm.bias"])
  return x.mean(axis=1)
