"""VPT's pad prompts for ConvNets (vpt.md 1.11): the frame and the initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import numpy_convnets as ref
from vpt_jax.models import convnet_base


# ----------------------------------------------------------------------------
# Pad prompts.


def test_pad_prompts_frame_the_image_like_the_reference():
  p, height, width = 2, 3, 4  # non-square, so rows and columns cannot be confused
  rng = np.random.default_rng(0)
  top_bottom = rng.uniform(0, 1, (2 * p, width + 2 * p, 3)).astype(np.float32)
  left_right = rng.uniform(0, 1, (height, 2 * p, 3)).astype(np.float32)
  images = rng.normal(0, 1, (2, height, width, 3)).astype(np.float32)
  framed = np.asarray(convnet_base.PadPrompts(p).apply(
      {"params": {"top_bottom": top_bottom, "left_right": left_right}}, images))

  norm = lambda t: (t - ref.IMAGENET_MEAN) / ref.IMAGENET_STD
  expected = np.zeros((2, height + 2 * p, width + 2 * p, 3))
  expected[:, p:p + height, p:p + width] = images
  expected[:, p:p + height, :p] = norm(left_right[:, :p])
  expected[:, p:p + height, p + width:] = norm(left_right[:, p:])
  expected[:, :p, :] = norm(top_bottom[:p])
  expected[:, p + height:, :] = norm(top_bottom[p:])
  np.testing.assert_allclose(framed, expected, rtol=1e-6, atol=1e-6)


def test_pad_prompts_start_uniform_in_pixel_units_with_the_reference_shapes():
  shapes = jax.eval_shape(convnet_base.PadPrompts(5).init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))["params"]
  assert shapes["top_bottom"].shape == (10, 234, 3)   # reference (1, 3, 2p, S + 2p)
  assert shapes["left_right"].shape == (224, 10, 3)   # reference (1, 3, S, 2p)
  params = convnet_base.PadPrompts(5).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  values = np.concatenate([np.ravel(v) for v in params.values()])  # 2,220 draws
  assert values.min() >= 0 and values.max() < 1 and abs(values.mean() - 0.5) < 0.03
