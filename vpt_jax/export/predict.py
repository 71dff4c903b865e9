"""Classify image files with a task export on its backbone."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
import tensorflow as tf

from vpt_jax import errors
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.export import task_export


def read_images(paths: Sequence[str], image_size: int) -> np.ndarray:
  """Decodes and resizes image files -> uint8 (N, image_size, image_size, 3).

  Raises:
    ValueError: naming the file that is missing or cannot be decoded.
  """
  images = []
  for path in paths:
    if not tf.io.gfile.exists(path):
      raise errors.UserError(f"image file {path!r} does not exist")
    try:
      image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
      raise errors.UserError(f"cannot decode image file {path!r}: {e.message}") from e
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    images.append(np.clip(np.round(image.numpy()), 0, 255).astype(np.uint8))
  return np.stack(images)


def predict_files(export_dir: str, paths: Sequence[str], *,
                  backbone_path: Optional[str] = None, top_k: int = 5) -> list[dict]:
  """Top-k classes per file: [{"file", "class", "probability", "classes"}] (``top_classes``)."""
  model, variables, metadata = task_export.load_task_variables(export_dir, backbone_path)
  images = read_images(paths, metadata["image_size"])
  norm = metadata["normalization"]
  logits = jax.jit(lambda v, x: model.apply(
      v, normalization_lib.normalize_images(x, norm["mean"], norm["std"])))(variables, images)
  probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
  names = task_export.class_names(metadata)
  return [{"file": path, **top_classes(probs, names, top_k)}
          for path, probs in zip(paths, probabilities)]


def top_classes(probabilities: np.ndarray, names: Sequence, top_k: int) -> dict:
  """{"class": the most likely name, "probability": its probability,
  "classes": [[name, probability], ...] of the ``top_k`` most likely}.

  ``probabilities``: (num_classes,), one per name; ties go to the lower class id.
  """
  best = np.argsort(-probabilities, kind="stable")[:top_k]
  return {"class": names[best[0]], "probability": float(probabilities[best[0]]),
          "classes": [[names[i], float(probabilities[i])] for i in best]}
