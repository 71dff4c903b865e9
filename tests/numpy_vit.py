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


def attention(x, params):
  """Self-attention over (B, T, D) with separate q/k/v kernels (D, H, hd)."""
  q = np.einsum("btd,dhk->bthk", x, params["query"]["kernel"]) + params["query"]["bias"]
  k = np.einsum("btd,dhk->bthk", x, params["key"]["kernel"]) + params["key"]["bias"]
  v = np.einsum("btd,dhk->bthk", x, params["value"]["kernel"]) + params["value"]["bias"]
  head_dim = q.shape[-1]
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(head_dim)
  weights = softmax(scores, axis=-1)
  mixed = np.einsum("bhqs,bshk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", mixed, params["out"]["kernel"]) + params["out"]["bias"]


def encoder_block(x, params):
  """Pre-LN Transformer block, (B, T, D) -> (B, T, D)."""
  y = layer_norm(x, params["LayerNorm_0"]["scale"], params["LayerNorm_0"]["bias"])
  x = x + attention(y, params["MultiHeadDotProductAttention_0"])
  y = layer_norm(x, params["LayerNorm_1"]["scale"], params["LayerNorm_1"]["bias"])
  mlp = params["MlpBlock_0"]
  y = gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
  return x + (y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"])


def prompt_sets(vpt_params):
  """The VPT parameters -> list of (p, D) prompt sets [shallow, deep_1, ...]."""
  sets = [vpt_params["shallow"]]
  if "deep" in vpt_params:
    sets += list(vpt_params["deep"])
  if "projection" in vpt_params:
    projection = vpt_params["projection"]
    sets = [s @ projection["kernel"] + projection["bias"] for s in sets]
  return sets


def encode(params, images, *, posemb_has_class_row=True):
  """Runs the encoder; returns (tokens after encoder_norm (B, 1+p+N, D), p).

  Args:
    params: nested params with the model's names (``embedding``, ``cls``,
      ``Transformer/...``, optionally ``vpt/{shallow, deep, projection}``).
    images: (B, H, W, 3).
    posemb_has_class_row: True for the vision_transformer convention (the
      embedding covers CLS); False for big_vision's ((1, N, D) added to the
      patches before CLS is prepended).
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
    x = encoder_block(x, transformer[f"encoderblock_{layer}"])
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


def vit_forward(params, images, *, pool_type="original", posemb_has_class_row=True,
                return_features=False):
  """Logits (B, C) (or pooled features (B, D)) of the prompted ViT, float64."""
  tokens, num_prompts = encode(params, images, posemb_has_class_row=posemb_has_class_row)
  features = pool(tokens, pool_type, num_prompts)
  if return_features:
    return features
  head = _f64(params["head"])
  return features @ head["kernel"] + head["bias"]
