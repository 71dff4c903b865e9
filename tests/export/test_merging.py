"""Merging into the backbone (export/merging.py): the plain ViT's logits equal the method's.

Each method's model gets random values in every leaf (so every update is
non-zero); the merged parameters are checked against the NumPy plain-ViT
reference (numpy_vit, which knows no method), and the written export reloads
as a ``linear`` model on the official-layout backbone with the same logits.
"""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_vit
import tolerances
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import vit_layouts
from vpt_jax.export import merging
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.models import vit
from vpt_jax.params import trees
from vpt_jax.training import config_checks

# Method -> its spec section (the tiny ViT's settings).
SECTIONS = {
    "lora": {"rank": 2, "alpha": 3.0, "targets": ["query", "key", "value", "out"]},
    "ssf": {"drop_path": 0.1},
    "difffit": {"drop_path": 0.1},
    "ln_tune": {"drop_path": 0.1},
    "fact_tt": {"rank": 3, "scale": 1.7, "dropout": 0.1, "drop_path": 0.1},
    "fact_tk": {"rank": 3, "scale": 1.7, "dropout": 0.1, "drop_path": 0.1},
    "repadapter": {"dim": 4, "groups": 2, "scale": 0.7, "dropout": 0.1, "drop_path": 0.1},
    "bias": None,
}
# The method's float32 model and the merged weights in float64 NumPy.
TOLERANCE = tolerances.FORWARD_VS_NUMPY


def _spec(method: str) -> dict:
  spec = {"method": method, "variant": "test/4", "image_size": 16, "dropout_rate": 0.1,
          "skip_dead_work": True, "dtype": "float32", "remat": "none", "num_prompts": 0,
          "pool": "original", "head_dropout": 0.1}
  settings = registry.get_method(method).settings
  if settings:
    spec[settings] = SECTIONS[method]
  return spec


@pytest.mark.numerics
@pytest.mark.parametrize("method", sorted(SECTIONS))
def test_merged_plain_vit_has_the_methods_logits(method):
  spec = _spec(method)
  hooks = registry.get_method(method).hooks(spec)
  model = vit.VisionTransformer(**fixtures.TINY_VIT, hooks=hooks)
  params = fixtures.random_params(model)
  images = fixtures.uniform_images()
  logits = np.asarray(model.apply({"params": params}, images))
  merged = merging.merged_params(spec, params)
  plain = vit.VisionTransformer(**fixtures.TINY_VIT)
  assert set(merged) == set(trees.flatten(fixtures.param_shapes(plain, 16)))
  np.testing.assert_allclose(logits, numpy_vit.vit_forward(trees.unflatten(merged), images),
                             **TOLERANCE)
  # float32 merged vs float32 unmerged: the folded weights differ from the
  # unmerged model's effective ones by one float32 rounding each (measured
  # <= 1e-6 on these O(1) logits), inside the issue's 1e-5.
  np.testing.assert_allclose(
      np.asarray(plain.apply({"params": trees.unflatten(merged)}, images)), logits,
      rtol=1e-5, atol=1e-5)


def test_export_reloads_as_a_linear_model_on_the_official_layout(tmp_path):
  spec = _spec("fact_tk")
  model = factory.build_model(spec, 4)
  params = fixtures.random_params(model)
  images = fixtures.uniform_images()
  directory = merging.export_merged(str(tmp_path / "merged"), params, spec=spec, num_classes=4,
                                    class_names=None, normalization={"mean": [0.5] * 3,
                                                                     "std": [0.5] * 3},
                                    init_seed=0)
  flat = npz.read_npz(f"{directory}/{merging.BACKBONE_FILE}")
  assert vit_layouts.detect_layout(flat) == "vit_raw"
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in flat
  merged_model, merged_params, metadata = task_export.load_task(directory)
  assert metadata["model"]["method"] == "linear" and metadata["merged_from"] == "fact_tk"
  np.testing.assert_allclose(np.asarray(merged_model.apply({"params": merged_params}, images)),
                             np.asarray(model.apply({"params": params}, images)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["vpt_deep", "adapter", "sidetune", "mlp-2"])
def test_methods_that_cannot_merge_are_refused(method):
  with pytest.raises(merging.MergeError, match="cannot merge"):
    merging.check_mergeable(method)


@pytest.mark.parametrize("variant", ["swin-T/4w7", "resnet-50", "mae-B/16"])
def test_backbones_without_the_plain_vit_layout_are_refused(variant):
  with pytest.raises(merging.MergeError, match="official layout"):
    merging.check_mergeable("bias", variant)


def test_config_check_refuses_before_compute():
  config = fixtures.method_config("vpt_deep", "test/4", 16)
  config.export.merged = True
  with pytest.raises(merging.MergeError, match="vpt_deep"):
    config_checks.validate_config(config)
