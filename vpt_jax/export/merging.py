"""Merging a trained method into the backbone: a plain ViT file plus a linear task.

For methods whose change is linear in the weights (``base.Method.merge``:
LoRA, SSF, FacT-TT/TK, RepAdapter, DiffFit, LN-tune, bias, partial-k, full,
linear), ``export_merged`` folds the update into the backbone weights (in
float64, then float32) and writes ``backbone.npz`` in the official
google-research/vision_transformer layout (pre-Linen names: ``LayerNorm_0``,
``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``, with the
trained ``head/kernel`` and ``head/bias`` as its fine-tuned releases carry
them) and, beside it, a task export of a ``linear`` model on that file. The
merged model is exactly the plain ViT: same structure and FLOPs; its logits
equal the unmerged model's up to float32 rounding. Methods that are not
linear in the weights (prompts, adapters with a non-linearity, side-tuning,
MLP-k heads) are refused with ``MergeError``.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import tensorflow as tf

from vpt_jax import errors
from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.models import backbones
from vpt_jax.models import vit_variants
from vpt_jax.params import freezing
from vpt_jax.params import trees

BACKBONE_FILE = "backbone.npz"
# Linen names inside a block -> the official (pre-Linen) names.
_OFFICIAL_BLOCK_NAMES = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0":
                         "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
                         "MlpBlock_0": "MlpBlock_3"}


class MergeError(errors.UserError):
  """A model that cannot be merged into a plain ViT."""


def check_mergeable(method_name: str, variant: str = "") -> None:
  """Raises MergeError naming why ``method_name`` on ``variant`` cannot merge (before compute)."""
  method = registry.get_method(method_name)
  if method.merge is None or method.head_hidden_layers:
    raise MergeError(f"method {method_name!r} cannot merge into the backbone: its change is "
                     "not linear in the weights; set config.export.merged=False")
  family = backbones.family_name(variant) if variant else "vit"
  if family != "vit" or vit_variants.variant_flavour(variant) == "mae":
    raise MergeError(f"merging writes the plain ViT's official layout, which {variant} "
                     "(its family or MAE's fc_norm) does not fit; set config.export.merged=False")


def merged_params(spec, params) -> dict[str, np.ndarray]:
  """The flat float32 params of the plain ViT (head included) with the method folded in."""
  check_mergeable(spec["method"], spec["variant"])
  flat = trees.flatten(jax.device_get(params))
  folded = registry.get_method(spec["method"]).merge(spec, flat)
  return {path: np.asarray(value, np.float32) for path, value in folded.items()}


def plain_spec(spec) -> dict:
  """The spec of the merged model: the same ViT as a ``linear`` model."""
  method = registry.get_method(spec["method"])
  linear = {k: v for k, v in spec.items() if not (method.settings and k == method.settings)}
  linear["method"] = "linear"
  return linear


def to_official_layout(flat: dict) -> dict:
  """Model (Linen) names -> the vision_transformer release's pre-Linen names."""
  def rename(path):
    match = re.fullmatch(r"(Transformer/encoderblock_\d+/)([A-Za-z]+_\d+)(/.*)", path)
    if not match:
      return path
    return match.group(1) + _OFFICIAL_BLOCK_NAMES[match.group(2)] + match.group(3)
  return {rename(path): value for path, value in flat.items()}


def export_merged(directory: str, params, *, spec: dict, num_classes: int, class_names,
                  normalization: dict, init_seed: int) -> str:
  """Writes ``directory/backbone.npz`` and a linear task export on it; returns the directory.

  Raises:
    MergeError: the method cannot merge, or the folded params are not exactly a
      plain ViT's (e.g. MAE's fc_norm, which the official layout has no place for).
  """
  flat = merged_params(spec, params)
  linear = plain_spec(spec)
  model = factory.build_model(linear, num_classes)
  expected = trees.flatten(factory.variable_shapes(model, spec["image_size"])["params"])
  if {p: tuple(v.shape) for p, v in expected.items()} != {p: v.shape for p, v in flat.items()}:
    extra = sorted(set(flat) ^ set(expected))
    raise MergeError(f"the merged {spec['method']} model is not a plain ViT (differs in "
                     f"{extra[:5] or 'shapes'}); export it without config.export.merged")
  tf.io.gfile.makedirs(directory)
  backbone_path = os.path.join(directory, BACKBONE_FILE)
  npz_lib.save_npz(to_official_layout(flat), backbone_path)
  tree = trees.unflatten(flat)
  labels = freezing.label_params(tree, registry.get_method("linear").rules())
  return task_export.export_task(
      directory, tree, labels, spec=linear, num_classes=num_classes, class_names=class_names,
      normalization=normalization, backbone_path=backbone_path,
      backbone_fingerprint=npz_lib.fingerprint(backbone_path), init_seed=init_seed,
      extra={"merged_from": spec["method"]})
