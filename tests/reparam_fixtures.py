"""Shared helpers of the re-parameterisable methods' tests (SSF, DiffFit, LN-tune, FacT, RepAdapter).

What trains over real steps, the export round trip and the merged export are
checked for every method in tests/integration/test_methods.py.
"""

from __future__ import annotations

import re

import numpy as np

import checkpoint_fixtures as fixtures
import numpy_reparam
import tolerances
from vpt_jax.methods import registry
from vpt_jax.models import vit
from vpt_jax.params import trees


def _hooks(method: str, settings: dict):
  spec_method = registry.get_method(method)
  return spec_method.hooks({spec_method.settings: settings})


def tiny_model(method: str, settings: dict):
  """The tiny test ViT with ``method``'s hooks built from ``settings`` (its spec section)."""
  return vit.VisionTransformer(**fixtures.TINY_VIT, hooks=_hooks(method, settings))


def assert_matches_numpy(model, **reference_options) -> None:
  """``model`` on random parameters and images equals ``numpy_reparam.vit_forward``.

  ``reference_options``: the reference's method scales (e.g. ``fact_scale``).
  """
  params = fixtures.random_params(model)  # every leaf random, so no update is zero
  images = fixtures.uniform_images()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, images)),
                             numpy_reparam.vit_forward(params, images, **reference_options),
                             **tolerances.FORWARD_VS_NUMPY)


def b16_count(method: str, settings: dict, pattern: str) -> int:
  """Parameters at ViT-B/16 (224 px) whose path fully matches ``pattern``."""
  model = vit.VisionTransformer(num_classes=10, variant="B/16", hooks=_hooks(method, settings))
  shapes = trees.flatten(fixtures.param_shapes(model, 224))
  return sum(int(np.prod(s.shape)) for p, s in shapes.items() if re.fullmatch(pattern, p))
