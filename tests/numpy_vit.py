"""Reference ViT + VPT forward in NumPy float64, written from the specification.

This is the yardstick the Flax model is tested against, so it follows the
official ViT / VPT definitions step by step and shares nothing with the model
code except the parameter names and shapes:

* patch embedding: a (P, P, 3, D) kernel applied to non-overlapping P x P
  patches, tokens in row-major order; CLS prepended; learned position embedding
  (1, 1 + N, D) added (or, big_vision style, (1, N, D) added to the patches
  before CLS is prepended);
* VPT (Jia et al. 2022): prompts inserted after CLS with no position
  embedding; deep prompts replace token positions 1..p before blocks 1..L-1;
  an optional shared linear projection maps prompts to width D;
* pre-LN blocks: LayerNorm (eps 1e-6), multi-head attention with separate
  q/k/v, scores scaled by 1/sqrt(head_dim), softmax, output projection,
  residual; LayerNorm, Dense, exact erf GELU, Dense, residual;
* final encoder_norm over all tokens, then a pool and the linear head.

and the other methods, each written from its paper / reference code:

* CVPT (cvpt.md 1.2-1.4): per block, the un-normalised tokens cross-attend to
  that block's prompts with the block's own q/k/v/out weights, at one of five
  insert positions; prompts never enter the sequence;
* E2VPT (cvpt.md 3): per-block key-value prompts prepended to the projected
  keys and values; VFPT (cvpt.md 4): Re(FFT) of the first prompts of each set;
* LoRA: W + (alpha / r) A B on the targeted projections; Pfeiffer adapters
  (vpt.md 1.9): MLP output y -> y + Up(GELU(Down(y))) before the residual;
* MLP-k heads (vpt.md 1.4) in eval mode (BatchNorm with running averages) and
  side-tuning (vpt.md 1.10): sigmoid(a) * f + (1 - sigmoid(a)) * side(x).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import scipy.special

LAYER_NORM_EPSILON = 1e-6


def _f64(tree: Mapping[str, Any]) -> dict:
  """Nested dict of arrays -> same structure of float64 numpy arrays."""
  return {k: _f64(v) if isinstance(v, Mapping) else np.asarray(v, np.float64)
          for k, v in tree.items()}


def layer_norm(x, scale, bias):
  """Normalises the last axis (biased variance), then scale and shift. (..., D)."""
  mean = x.mean(axis=-1, keepdims=True)
  variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
  return (x - mean) / np.sqrt(variance + LAYER_NORM_EPSILON) * scale + bias


def gelu(x):
  """Exact GELU: x * Phi(x) with the Gaussian CDF written through erf."""
  return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))


def softmax(x, axis=-1):
  shifted = x - x.max(axis=axis, keepdims=True)
  e = np.exp(shifted)
  return e / e.sum(axis=axis, keepdims=True)


def patch_embed(images, kernel, bias):
  """(B, H, W, C) images, (P, P, C, D) kernel -> (B, (H/P)*(W/P), D) tokens."""
  b, h, w, c = images.shape
  p = kernel.shape[0]
  patches = images.reshape(b, h // p, p, w // p, p, c)
  # -> (B, rows, cols, P, P, C): each patch's pixels in (row, col, channel) order,
  # the same order as the kernel's first three axes.
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
  return patches @ kernel.reshape(p * p * c, -1) + bias


def lora_kernel(params, name, lora_alpha):
  """W of projection ``name``, plus (alpha / r) A B when it has LoRA factors."""
  kernel = params[name]["kernel"]
  lora = params.get(f"lora_{name}")
  if lora is None:
    return kernel
  a, b = lora["a"], lora["b"]  # (in..., r), (r, out...)
  rank = a.shape[-1]
  return kernel + (lora_alpha / rank) * np.tensordot(a, b, axes=1)


def attention(x, params, kv=None, kv_prompts=None, lora_alpha=None):
  """Attention of queries from x (B, T, D) over keys/values from kv (default x).

  Separate q/k/v kernels (D, H, hd). ``kv_prompts`` (N, H, hd): E2VPT prompts
  prepended to the projected keys and values. LoRA factors in ``params``
  (``lora_{name}``) are merged into the kernels with scale lora_alpha / r.
  """
  kv = x if kv is None else kv
  kernel = lambda name: lora_kernel(params, name, lora_alpha)
  q = np.einsum("btd,dhk->bthk", x, kernel("query")) + params["query"]["bias"]
  k = np.einsum("btd,dhk->bthk", kv, kernel("key")) + params["key"]["bias"]
  v = np.einsum("btd,dhk->bthk", kv, kernel("value")) + params["value"]["bias"]
  if kv_prompts is not None:
    prompts = np.broadcast_to(kv_prompts, (k.shape[0],) + kv_prompts.shape)
    k = np.concatenate([prompts, k], axis=1)
    v = np.concatenate([prompts, v], axis=1)
  head_dim = q.shape[-1]
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(head_dim)
  weights = softmax(scores, axis=-1)
  mixed = np.einsum("bhqs,bshk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", mixed, kernel("out")) + params["out"]["bias"]


def encoder_block(x, params, *, cross_prompts=None, insert=3, kv_prompts=None,
                  lora_alpha=None, cross_params=None):
  """Pre-LN Transformer block, (B, T, D) -> (B, T, D).

  ``cross_prompts`` (m, D): CVPT's cross-attention CA(z) = attention(q=z,
  kv=prompts) with this block's attention weights, added at ``insert``:
  1 before the SA sub-block; 2 inside the SA residual; 3 between SA and MLP;
  4 to the MLP's normalised input; 5 after the MLP.
  ``cross_params`` replaces the cross-attention's weights (default: the
  block's own attention weights, as CVPT shares them).
  An ``adapter`` in params adds Up(GELU(Down(y))) to the MLP output y.
  """
  attn = params["MultiHeadDotProductAttention_0"]
  where = insert if cross_prompts is not None else None
  if where is not None:
    prompts = np.broadcast_to(cross_prompts, (x.shape[0],) + cross_prompts.shape)
    cross_attn = attn if cross_params is None else cross_params
    cross = lambda z: attention(z, cross_attn, kv=prompts, lora_alpha=lora_alpha)
  if where == 1:
    x = x + cross(x)
  y = layer_norm(x, params["LayerNorm_0"]["scale"], params["LayerNorm_0"]["bias"])
  branch = attention(y, attn, kv_prompts=kv_prompts, lora_alpha=lora_alpha)
  if where == 2:
    branch = branch + cross(x)
  x = x + branch
  if where == 3:
    x = x + cross(x)
  y = layer_norm(x, params["LayerNorm_1"]["scale"], params["LayerNorm_1"]["bias"])
  if where == 4:
    y = y + cross(x)
  mlp = params["MlpBlock_0"]
  y = gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
  y = y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
  if "adapter" in params:
    adapter = params["adapter"]
    down = gelu(y @ adapter["down"]["kernel"] + adapter["down"]["bias"])
    y = y + (down @ adapter["up"]["kernel"] + adapter["up"]["bias"])
  x = x + y
  if where == 5:
    x = x + cross(x)
  return x


def fourier(prompt_set, num_fourier, dimension="all"):
  """VFPT: the first num_fourier rows of a (P, D) set -> Re(DFT); the rest kept."""
  head = prompt_set[:num_fourier].astype(np.complex128)
  if dimension in ("all", "hidden"):
    head = np.fft.fft(head, axis=1)
  if dimension in ("all", "sequence"):
    head = np.fft.fft(head, axis=0)
  return np.concatenate([head.real, prompt_set[num_fourier:]], axis=0)


def prompt_sets(vpt_params):
  """The VPT parameters -> list of (p, D) prompt sets [shallow, deep_1, ...]."""
  sets = [vpt_params["shallow"]]
  if "deep" in vpt_params:
    sets += list(vpt_params["deep"])
  if "projection" in vpt_params:
    projection = vpt_params["projection"]
    sets = [s @ projection["kernel"] + projection["bias"] for s in sets]
  return sets


def encode(params, images, *, posemb_has_class_row=True, cvpt_insert=3, fourier_prompts=0,
           fourier_dimension="all", lora_alpha=None, cross_attention_params=None):
  """Runs the encoder; returns (tokens after encoder_norm (B, 1+p+N, D), p).

  Args:
    params: nested params with the model's names (``embedding``, ``cls``,
      ``Transformer/...``, optionally ``vpt/{shallow, deep, projection}``,
      ``cvpt/prompts`` (L, m, D), ``e2vpt/kv_prompts`` (L, H, N, hd), adapters
      and LoRA factors inside the blocks).
    images: (B, H, W, 3).
    posemb_has_class_row: True for the vision_transformer convention (the
      embedding covers CLS); False for big_vision's ((1, N, D) added to the
      patches before CLS is prepended).
    cvpt_insert: CVPT's insert position (1..5).
    fourier_prompts, fourier_dimension: VFPT's n_f and transform.
    lora_alpha: LoRA's alpha (the rank is the factors' inner size).
    cross_attention_params: {layer: attention params} for CVPT cross-attentions
      that do not share the block's weights (a test's counterfactual).
  """
  params = _f64(params)
  images = np.asarray(images, np.float64)
  transformer = params["Transformer"]
  x = patch_embed(images, params["embedding"]["kernel"], params["embedding"]["bias"])
  batch, _, width = x.shape
  cls = np.broadcast_to(params["cls"], (batch, 1, width))
  posemb = transformer["posembed_input"]["pos_embedding"]
  if posemb_has_class_row:
    x = np.concatenate([cls, x], axis=1) + posemb
  else:
    x = np.concatenate([cls, x + posemb], axis=1)

  sets = prompt_sets(params["vpt"]) if "vpt" in params else []
  if fourier_prompts:
    sets = [fourier(s, fourier_prompts, fourier_dimension) for s in sets]
  cvpt = params["cvpt"]["prompts"] if "cvpt" in params else None
  # E2VPT stores (L, H, N, hd); attention takes one block's (N, H, hd).
  kv = params["e2vpt"]["kv_prompts"].transpose(0, 2, 1, 3) if "e2vpt" in params else None
  num_prompts = sets[0].shape[0] if sets else 0
  if sets:
    x = np.concatenate([x[:, :1], np.broadcast_to(sets[0], (batch,) + sets[0].shape),
                        x[:, 1:]], axis=1)
  depth = sum(1 for name in transformer if name.startswith("encoderblock_"))
  if len(sets) > 1 and len(sets) != depth:
    raise ValueError(f"deep VPT needs {depth} prompt sets, got {len(sets)}")
  for layer in range(depth):
    if layer > 0 and len(sets) > 1:
      x = x.copy()
      x[:, 1:1 + num_prompts] = sets[layer]  # previous prompt outputs are discarded
    x = encoder_block(x, transformer[f"encoderblock_{layer}"],
                      cross_prompts=None if cvpt is None else cvpt[layer], insert=cvpt_insert,
                      kv_prompts=None if kv is None else kv[layer], lora_alpha=lora_alpha,
                      cross_params=_f64((cross_attention_params or {}).get(layer, {})) or None)
  norm = transformer["encoder_norm"]
  return layer_norm(x, norm["scale"], norm["bias"]), num_prompts


def pool(tokens, pool_type, num_prompts):
  """[CLS, prompts, patches] (B, T, D) -> (B, D)."""
  if pool_type == "original":
    return tokens[:, 0]
  if pool_type == "prompt_pool":
    return tokens[:, 1:1 + num_prompts].mean(axis=1)
  if pool_type == "img_pool":
    return tokens[:, 1 + num_prompts:].mean(axis=1)
  if pool_type == "imgprompt_pool":
    return tokens[:, 1:].mean(axis=1)
  raise ValueError(pool_type)


def conv_same(x, kernel, bias, stride):
  """2-D convolution with "SAME" padding: (B, H, W, C), (k, k, C, F) -> (B, H/s, W/s, F)."""
  size = kernel.shape[0]
  out = -(-x.shape[1] // stride)
  pad = max((out - 1) * stride + size - x.shape[1], 0)
  x = np.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2), (0, 0)))
  y = np.zeros(x.shape[:1] + (out, out, kernel.shape[-1]))
  for di in range(size):
    for dj in range(size):
      window = x[:, di:di + stride * out:stride, dj:dj + stride * out:stride]
      y += window @ kernel[di, dj]
  return y + bias


def side_features(side, images, features):
  """Side-tuning: sigmoid(a) * features + (1 - sigmoid(a)) * projection(pool(CNN(x)))."""
  x = images
  for i in range(sum(1 for name in side if name.startswith("conv_"))):
    x = np.maximum(conv_same(x, side[f"conv_{i}"]["kernel"], side[f"conv_{i}"]["bias"], 2), 0)
  side_out = x.mean(axis=(1, 2)) @ side["projection"]["kernel"]
  gate = 1.0 / (1.0 + np.exp(-side["alpha"]))
  return gate * features + (1 - gate) * side_out


def head_forward(head, features, batch_stats=None):
  """The head in eval mode: hidden Dense -> ReLU -> BatchNorm (running stats), then Dense."""
  x = features
  for i in range(sum(1 for name in head if name.startswith("hidden_"))):
    x = np.maximum(x @ head[f"hidden_{i}"]["kernel"] + head[f"hidden_{i}"]["bias"], 0)
    stats, norm = batch_stats[f"batchnorm_{i}"], head[f"batchnorm_{i}"]
    x = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * norm["scale"] + norm["bias"]
  return x @ head["kernel"] + head["bias"]


def vit_forward(params, images, *, pool_type="original", posemb_has_class_row=True,
                return_features=False, batch_stats=None, **method_kwargs):
  """Logits (B, C) (or pooled features (B, D)) of the prompted ViT, float64.

  ``batch_stats``: the head's BatchNorm running averages (MLP-k heads);
  ``method_kwargs``: see ``encode``.
  """
  tokens, num_prompts = encode(params, images, posemb_has_class_row=posemb_has_class_row,
                               **method_kwargs)
  features = pool(tokens, pool_type, num_prompts)
  if "side" in params:
    features = side_features(_f64(params["side"]), np.asarray(images, np.float64), features)
  if return_features:
    return features
  head_stats = _f64(batch_stats["head"]) if batch_stats else None
  return head_forward(_f64(params["head"]), features, head_stats)
