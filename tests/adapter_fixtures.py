"""One Flax block with a method's hooks on random weights, and a method's size at ViT-B/16."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint_fixtures as fixtures
from vpt_jax.models import vit
from vpt_jax.models import vit_blocks
from vpt_jax.params import trees

# The tiny block: width 16, MLP 32, 2 heads; 1 CLS + a 3 x 3 token grid.
WIDTH, MLP, HEADS, GRID = 16, 32, 2, 3


def tokens(batch: int = 2, seed: int = 0) -> np.ndarray:
  """(batch, 1 + GRID^2, WIDTH) float32 tokens drawn from U(-1, 1)."""
  shape = (batch, 1 + GRID * GRID, WIDTH)
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def random_block(hooks, x, seed: int = 3):
  """(block, params): an Encoder1DBlock with ``hooks`` and random values in every leaf."""
  block = vit_blocks.Encoder1DBlock(MLP, HEADS, hooks=hooks)
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.asarray(x)))["params"]
  return block, fixtures.randomize(shapes, seed)


def initial_block_params(hooks, x, seed: int = 0) -> dict:
  """The flat parameters the block's own initialisers draw."""
  block = vit_blocks.Encoder1DBlock(MLP, HEADS, hooks=hooks)
  return trees.flatten(block.init(jax.random.key(seed), jnp.asarray(x))["params"])


def b16_count(hooks, pattern: str) -> int:
  """Parameters matching ``pattern`` (full match) in a ViT-B/16 with ``hooks`` (shapes only)."""
  model = vit.VisionTransformer(num_classes=2, variant="B/16", hooks=hooks)
  # 16 px images (one patch): the method's parameters do not depend on the image size.
  shapes = trees.flatten(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))["params"])
  return sum(int(np.prod(v.shape)) for p, v in shapes.items() if re.fullmatch(pattern, p))
