"""VQT (methods/vqt.py) against a float64 NumPy transcription of the official
Head2Toe encoder (andytu28/VQT h2t_vit.py: queries prepended, keys/values from
the other tokens only, outputs collected and removed) and its feature combines;
closed-form trainable counts at ViT-B/16."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_vit
import tolerances
from configs import common
from vpt_jax.methods import factory
from vpt_jax.methods import vqt
from vpt_jax.models import vit

T, SIZE, DEPTH, WIDTH = 2, 16, 4, 16


def _normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _query_block(x, queries, block):
  """One block over [queries; x] whose keys/values are x's rows only."""
  rows = np.concatenate([np.broadcast_to(queries, (len(x),) + queries.shape), x], axis=1)
  y = numpy_vit.layer_norm(rows, block["LayerNorm_0"]["scale"], block["LayerNorm_0"]["bias"])
  rows = rows + numpy_vit.attention(y, block["MultiHeadDotProductAttention_0"], kv=y[:, T:])
  y = numpy_vit.layer_norm(rows, block["LayerNorm_1"]["scale"], block["LayerNorm_1"]["bias"])
  mlp = block["MlpBlock_0"]
  y = numpy_vit.gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
  rows = rows + (y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"])
  return rows[:, T:], rows[:, :T]


def reference_logits(params, images, combine):
  params = numpy_vit._f64(params)
  transformer = params["Transformer"]
  tokens = numpy_vit.patch_embed(np.asarray(images, np.float64), params["embedding"]["kernel"],
                                 params["embedding"]["bias"])
  cls = np.broadcast_to(params["cls"], (len(images), 1, WIDTH))
  x = np.concatenate([cls, tokens], axis=1) + transformer["posembed_input"]["pos_embedding"]
  outputs = []
  for layer in range(DEPTH):
    x, out = _query_block(x, params["vqt"]["queries"][layer], transformer[f"encoderblock_{layer}"])
    outputs.append(out)
  norm = transformer["encoder_norm"]
  cls_out = numpy_vit.layer_norm(x, norm["scale"], norm["bias"])[:, 0]
  if combine == "osu":  # [q_1,1 .. q_L,T, CLS], each normalised, weighted sum
    vectors = np.concatenate(outputs + [cls_out[:, None]], axis=1)
    features = np.einsum("bnd,n->bd", _normalize(vectors), params["vqt_head"]["combine"])
  else:
    per_layer = {"concat": lambda l, q: q.reshape(len(q), -1),
                 "mean": lambda l, q: q.mean(axis=1),
                 "weighted_sum": lambda l, q: np.einsum(
                     "btd,t->bd", q, params["vqt_head"]["combine"][l])}[combine]
    features = np.concatenate([_normalize(cls_out)] + [
        _normalize(per_layer(l, q)) for l, q in enumerate(outputs)], axis=1)
  return numpy_vit.head_forward(params["head"], features)


@pytest.mark.numerics
@pytest.mark.parametrize("combine", vqt.COMBINES)
def test_vqt_matches_the_reference(combine):
  model = vit.VisionTransformer(num_classes=4, variant="test4/4",
                                hooks=vqt.VqtOptions(T, dropout=0.1, combine=combine))
  params = fixtures.random_params(model, image_size=SIZE)
  images = fixtures.uniform_images(image_size=SIZE)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, images)),
                             reference_logits(params, images, combine),
                             **tolerances.FORWARD_VS_NUMPY)


def test_queries_never_change_the_backbone_tokens():
  # Same params without the query path: the CLS part of the features is the plain one.
  model = vit.VisionTransformer(num_classes=4, variant="test4/4", hooks=vqt.VqtOptions(T))
  plain = vit.VisionTransformer(num_classes=4, variant="test4/4")
  params = fixtures.random_params(model, image_size=SIZE)
  images = fixtures.uniform_images(image_size=SIZE)
  features = np.asarray(model.apply({"params": params}, images, return_features=True))
  backbone = {k: v for k, v in params.items() if k not in ("vqt", "head")}
  cls = np.asarray(plain.apply({"params": {**backbone, "head": params["head"]}}, images,
                               return_features=True))
  np.testing.assert_allclose(features[:, :WIDTH], _normalize(cls), atol=1e-6)
  assert features.shape == (2, WIDTH * (1 + DEPTH * T))


def _config(**vqt_settings):
  config = common.base_config()
  common.apply_method(config, "vqt")
  config.model.variant = "B/16"
  for key, value in vqt_settings.items():
    setattr(config.vqt, key, value)
  return config


@pytest.mark.parametrize("combine, expected", [
    # queries L T D + head (D (1 + L T) C + C) with L = 12, D = 768, T = 1, C = 10
    ("concat", 12 * 768 + 768 * 13 * 10 + 10),
    ("mean", 12 * 768 + 768 * 13 * 10 + 10),
    ("weighted_sum", 12 * 768 + 12 + 768 * 13 * 10 + 10),
    # OSU: D features, combine weights L T + 1
    ("osu", 12 * 768 + 13 + 768 * 10 + 10),
])
def test_trainable_counts_at_b16(combine, expected):
  config = _config(combine=combine)
  model = factory.build_model(factory.model_spec(config), 10)
  shapes = factory.variable_shapes(model, 224)["params"]
  count = sum(int(np.prod(leaf.shape)) for name in ("vqt", "vqt_head", "head") if name in shapes
              for leaf in _leaves(shapes[name]))
  assert count == expected


def _leaves(tree):
  for value in tree.values():
    yield from (_leaves(value) if isinstance(value, dict) else [value])


@pytest.mark.parametrize("settings, message", [
    (dict(num_queries=0), "vqt.num_queries must be >= 1"),
    (dict(combine="sum"), "Unknown vqt.combine"),
    (dict(dropout=1.0), r"vqt.dropout must lie in \[0, 1\)"),
])
def test_bad_settings_are_refused(settings, message):
  with pytest.raises(ValueError, match=message):
    factory.validate_spec(factory.model_spec(_config(**settings)))
