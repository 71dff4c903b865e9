"""Head-only methods train on backbone features computed once, not every step.

When only ``head/`` parameters train and the backbone's output is a fixed
function of the (unaugmented) image, the frozen backbone runs once over the
training split; the head then trains on the cached (N, D) features, with the
batches (order, dropout rng) of the uncached run.
"""

from __future__ import annotations

import jax
import numpy as np

from vpt_jax.data import normalization as normalization_lib
from vpt_jax.methods import registry
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import mesh as mesh_lib


def uses_cached_features(config, labels) -> bool:
  """Whether the head can train on backbone features computed once.

  True when ``config.cache_features`` is on and the features are a fixed
  function of the image: only ``head/`` parameters train, the method adds no
  (possibly stochastic) parameters of its own (prompts, side network) and the
  backbone runs without dropout. The training data is not augmented (the
  pipeline decodes every image once), so linear and mlp-k qualify.
  """
  method = registry.get_method(config.method)
  trainable = [p for p, label in trees.flatten(labels).items()
               if label == freezing.TRAIN]
  return bool(config.cache_features and not method.fresh and not method.backbone_dropout
              and config.data.preprocess == "resize"  # no augmentation
              and all(p.startswith("head/") for p in trainable))


def compute_features(model, variables, images: np.ndarray, mesh, *, batch_size: int,
                     norm: dict) -> np.ndarray:
  """The pooled backbone features (N, D) float32 of uint8 images (N, S, S, 3).

  Eval mode, ``batch_size`` images per global batch (the last one padded), the
  rows split over the mesh; every process holds all N images (as
  ``load_train_data`` does) and gets all N features back.
  """
  mesh_lib.check_batch_divisible(batch_size, mesh)
  replicated = mesh_lib.replicated(mesh)
  extract = jax.jit(
      lambda v, x: model.apply(v, normalization_lib.normalize_images(x, **norm), train=False,
                               return_features=True),
      in_shardings=(replicated, mesh_lib.batch_sharded(mesh)), out_shardings=replicated)
  local = batch_size // jax.process_count()
  first = jax.process_index() * local
  chunks = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:],
                                              chunk.dtype)])
    rows = mesh_lib.global_batch(mesh, {"x": chunk[first:first + local]})["x"]
    chunks.append(np.asarray(jax.device_get(extract(variables, rows)))[:real])
  return np.concatenate(chunks)
