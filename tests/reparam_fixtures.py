"""Shared checks of the re-parameterisable methods' tests (SSF, DiffFit, LN-tune, FacT, RepAdapter)."""

from __future__ import annotations

import re

import numpy as np

import checkpoint_fixtures as fixtures
from method_fixtures import assert_only_trainable_changed
from method_fixtures import train_steps
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.models import vit
from vpt_jax.params import freezing
from vpt_jax.params import trees

NORMALIZATION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def tiny_model(method: str, settings: dict):
  """The tiny test ViT with ``method``'s hooks built from ``settings`` (its spec section)."""
  spec_method = registry.get_method(method)
  hooks = spec_method.hooks({spec_method.settings: settings} if spec_method.settings else {})
  return vit.VisionTransformer(**fixtures.TINY_VIT, hooks=hooks)


def b16_count(method: str, settings: dict, pattern: str) -> int:
  """Parameters at ViT-B/16 (224 px) whose path fully matches ``pattern``."""
  spec_method = registry.get_method(method)
  hooks = spec_method.hooks({spec_method.settings: settings} if spec_method.settings else {})
  model = vit.VisionTransformer(num_classes=10, variant="B/16", hooks=hooks)
  shapes = trees.flatten(fixtures.param_shapes(model, 224))
  return sum(int(np.prod(s.shape)) for p, s in shapes.items() if re.fullmatch(pattern, p))


def assert_trains_only(method: str, settings: dict, expected: str) -> None:
  """A few real AdamW steps (dropout and drop path on) move exactly the paths matching
  ``expected`` (plus the head); every other leaf stays bit-identical."""
  model = tiny_model(method, settings)
  params = factory.init_variables(model, 16, seed=0)["params"]
  labels = freezing.label_params(params, registry.get_method(method).rules())
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
           "label": rng.integers(0, 4, (4,)).astype(np.int32)}
  initial, state, losses = train_steps(
      model, params, labels, batch, optimizer=registry.get_method(method).optimizer,
      learning_rate=1e-2, weight_decay=1e-4, normalization=NORMALIZATION)
  assert all(np.isfinite(losses)), losses
  trainable = lambda path: bool(re.fullmatch(f"({expected})|head/.*", path))
  flat_labels = trees.flatten(labels)
  for path, label in flat_labels.items():
    assert (label == freezing.TRAIN) == trainable(path), path
  assert_only_trainable_changed(trees.flatten(initial["params"]),
                                trees.flatten(state["params"]), trainable)
