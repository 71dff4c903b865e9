"""Checking and converting a ViT-like PyTorch state dict by a family's key layout.

A family describes its file as a layout {file key: (model key, file shape)}
(-1 = any size, e.g. a position embedding's token count). ``check_torch_layout``
refuses a file that does not fit, naming every missing, unexpected and
misshapen file key at once; ``converted_arrays`` puts the file's arrays under
the model's names, choosing the transform by the model key, so timm, DINOv2,
CLIP and SigLIP files share it:

* ``.../{query,key,value}/kernel|bias``: a fused (3D, D) projection (timm's
  ``qkv``, torch's ``in_proj_weight``) split into q | k | v row blocks, each
  head-major: row ``w * D + h * D/H + d`` is head h, dimension d of q/k/v
  (w = 0, 1, 2) -> kernels (D, H, D/H), biases (H, D/H);
* ``.../query|key|value/kernel|bias`` alone: one (D, D) projection likewise;
* ``.../MultiHeadDotProductAttention_0/out/kernel``: (D, D) -> (H, D/H, D);
* ``embedding/kernel``: the patch convolution (D, 3, P, P) -> HWIO (P, P, 3, D);
* ``cls`` / ``.../pos_embedding`` stored without their batch axes (CLIP's
  ``class_embedding`` (D,), ``positional_embedding`` (N, D)): -> (1, ·, D);
* ``projection/kernel``: CLIP's ``proj`` (D, E) is used as x @ proj: unchanged;
* any other 2-D array is a Linear weight (out, in) -> Dense kernel (in, out).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.models import vit_variants

_QKV_NAMES = ("query", "key", "value")


def file_architecture(arrays: Mapping[str, Any]) -> str:
  """"width 768, 12 blocks" as far as the file's shapes tell (timm, DINOv2, CLIP, HF)."""
  facts = []
  widths = [np.shape(v)[-1] for k, v in arrays.items()
            if re.search(r"(cls_token|class_embedding|norm1?\.weight|layer_norm1\.weight)$", k)]
  if widths:
    facts.append(f"width {widths[0]}")
  blocks = {int(m.group(1)) for key in arrays
            if (m := re.search(r"(?:blocks|resblocks|layers|layer)\.(\d+)\.", key))}
  if blocks:
    facts.append(f"{max(blocks) + 1} blocks")
  return ", ".join(facts) or "no ViT tensors"


def check_torch_layout(arrays: Mapping[str, Any], layout: dict, variant: str,
                       size: vit_variants.ViTSize, hint: str) -> None:
  """Raises CheckpointMismatchError listing missing, unexpected and misshapen keys."""
  missing = sorted(key for key in layout if key not in arrays)
  unexpected = sorted(key for key in arrays if key not in layout)
  mismatched = []
  for key, (_, want) in layout.items():
    if key in arrays:
      shape = tuple(np.shape(arrays[key]))
      if len(shape) != len(want) or any(w not in (-1, s) for s, w in zip(shape, want)):
        mismatched.append((key, shape, tuple(want)))
  if missing or unexpected or mismatched:
    lines = [f"The PyTorch state dict does not fit {variant} (file: "
             f"{file_architecture(arrays)}; variant: width {size.width}, {size.depth} "
             "blocks):"]
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
      if keys:
        lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20])
                     + (" ..." if len(keys) > 20 else ""))
    lines += [f"  {key}: file {shape} vs expected {want}" for key, shape, want in mismatched]
    lines.append(hint)
    raise npz_lib.CheckpointMismatchError("\n".join(lines), missing, unexpected, mismatched)


def checked_conversion(arrays: Mapping[str, Any], layout: dict, variant: str,
                       size: vit_variants.ViTSize, hint: str) -> dict[str, np.ndarray]:
  """``check_torch_layout`` then ``converted_arrays``: what every family's converter ends with."""
  check_torch_layout(arrays, layout, variant, size, hint)
  return converted_arrays(arrays, layout, size)


def _split_fused(ours: str, value: np.ndarray, size: vit_variants.ViTSize) -> dict:
  """A fused q|k|v weight (3D, D) or bias (3D,) -> the three per-head arrays."""
  width = size.width
  prefix, kind = ours.split("{")[0], ours.rsplit("/", 1)[-1]
  out = {}
  for index, name in enumerate(_QKV_NAMES):
    rows = value[index * width:(index + 1) * width]
    out[f"{prefix}{name}/{kind}"] = _per_head(rows, kind, size)
  return out


def _per_head(rows: np.ndarray, kind: str, size: vit_variants.ViTSize) -> np.ndarray:
  """One projection's (D_out, D_in) weight or (D_out,) bias in per-head layout."""
  head_dim = size.width // size.num_heads
  if kind == "kernel":
    return rows.T.reshape(rows.shape[1], size.num_heads, head_dim)
  return rows.reshape(size.num_heads, head_dim)


def converted_arrays(arrays: Mapping[str, Any], layout: dict,
                     size: vit_variants.ViTSize) -> dict[str, np.ndarray]:
  """The file's arrays under the model's names (see the module docstring)."""
  out: dict[str, np.ndarray] = {}
  for key, (ours, _) in layout.items():
    value = np.asarray(arrays[key])
    leaf = ours.rsplit("/", 1)[-1]
    parent = ours.rsplit("/", 2)[-2] if ours.count("/") >= 1 else ""
    if "{" in ours:
      out.update(_split_fused(ours, value, size))
    elif parent in _QKV_NAMES and "MultiHeadDotProductAttention" in ours:
      out[ours] = _per_head(value, leaf, size)
    elif ours.endswith("MultiHeadDotProductAttention_0/out/kernel"):
      out[ours] = value.T.reshape(size.num_heads, size.width // size.num_heads, -1)
    elif ours == "embedding/kernel":
      out[ours] = value.transpose(2, 3, 1, 0)
    elif (ours == "cls" or leaf == "pos_embedding") and value.ndim < 3:
      out[ours] = value.reshape(1, -1, value.shape[-1])
    elif value.ndim == 2 and ours != "projection/kernel":
      out[ours] = value.T
    else:
      out[ours] = value
  return out
