"""Image normalisation: the named (mean, std) pairs, the config's choice, the operation.

Images travel as uint8 through the input pipeline and are normalised on device
at the start of each step (``normalize_images``). This module imports neither
TensorFlow nor TFDS, so models, exports and benchmarks can use it without
loading them.
"""

from __future__ import annotations

import jax.numpy as jnp

from vpt_jax import errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (mean, std) that map [0, 1] to [-1, 1], the input range of the Google ViTs.
MINUS_ONE_TO_ONE = ((0.5,) * 3, (0.5,) * 3)
# data.normalization values -> (mean, std).
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "minus_one_to_one": MINUS_ONE_TO_ONE,
}


def mean_std(name: str) -> dict:
  """{"mean": (3,), "std": (3,)} of a ``data.normalization`` name.

  Raises:
    errors.UserError: an unknown name (the valid ones are listed).
  """
  if name not in NORMALIZATIONS:
    raise errors.UserError(f"Unknown data.normalization {name!r}; choose one of "
                     f"{sorted(NORMALIZATIONS)}")
  mean, std = NORMALIZATIONS[name]
  return {"mean": mean, "std": std}


def normalize_images(images, mean, std):
  """uint8 (B, H, W, 3) -> float32 ((x / 255) - mean) / std."""
  images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
