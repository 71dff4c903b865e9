"""NumPy float64 references of one pre-LN block with adapters, written from the official codes.

A block is LN0 -> attention -> residual, LN1 -> MLP -> residual (numpy_vit's
pieces); the adapter methods change it at named places, given here as
functions of float64 arrays:

* ``attention_branch(a)`` / ``mlp_branch(m)``: the branch before its residual
  (Houlsby's sequential adapters);
* ``attention_side(y, x)`` / ``mlp_side(y, x)``: a term added beside the
  branch, from its normalised input y and the stream x (AdaptFormer, Convpass);
* ``output(x)``: the block's output (Adapter+).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import scipy.special

import numpy_vit

TORCH_LAYER_NORM_EPSILON = 1e-5


def f64(tree: Mapping[str, Any]) -> dict:
  """Nested dict of arrays -> the same structure in float64."""
  return {k: f64(v) if isinstance(v, Mapping) else np.asarray(v, np.float64)
          for k, v in tree.items()}


def relu(x):
  return np.maximum(x, 0.0)


def quick_gelu(x):
  """x * sigmoid(1.702 x), written through expit."""
  return x * scipy.special.expit(1.702 * x)


def dense(x, params):
  return x @ params["kernel"] + params["bias"]


def bottleneck(x, params, activation):
  """Up(act(Down(x))) in evaluation (no dropout)."""
  return dense(activation(dense(x, params["down"])), params["up"])


def torch_layer_norm(x, params):
  """nn.LayerNorm with torch's default eps 1e-5 (biased variance)."""
  mean = x.mean(-1, keepdims=True)
  variance = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(variance + TORCH_LAYER_NORM_EPSILON) * params["scale"] + \
      params["bias"]


def block(x, params, *, attention_branch=None, attention_side=None, mlp_branch=None,
          mlp_side=None, output=None):
  """One pre-LN block (B, N, D) -> (B, N, D) with the given adapter functions."""
  identity = lambda value: value
  p = f64(params)
  x = np.asarray(x, np.float64)
  y = numpy_vit.layer_norm(x, p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"])
  branch = numpy_vit.attention(y, p["MultiHeadDotProductAttention_0"])
  side = attention_side(y, x) if attention_side else 0.0
  x = x + (attention_branch or identity)(branch) + side
  y = numpy_vit.layer_norm(x, p["LayerNorm_1"]["scale"], p["LayerNorm_1"]["bias"])
  mlp = p["MlpBlock_0"]
  branch = dense(numpy_vit.gelu(dense(y, mlp["Dense_0"])), mlp["Dense_1"])
  side = mlp_side(y, x) if mlp_side else 0.0
  x = x + (mlp_branch or identity)(branch) + side
  return (output or identity)(x)
