"""Pretrains the quickstart's backbone on procedural sprites (no download).

The recipe: single sprites drawn fresh every epoch (``sprites.generate``), one
linear head per label attribute on the CLS feature (shape, colour, scale), the
summed cross-entropies, AdamW with global-norm clipping and a warmup-cosine
schedule. Only the backbone is kept: it is written in the ``.npz`` layout our
loader reads (the Linen names of the vision_transformer checkpoints), so the
quickstart loads it exactly as it would load ViT-B/16 from ImageNet-21k.

``python run.py --config configs/pretrain_sprites.py --workdir DIR`` writes
``DIR/<config.output_name>``; the shipped ``assets/sprites_vit_nano8.npz`` was
made this way.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.data import sprites
from vpt_jax.models import vit
from vpt_jax.models import vit_variants
from vpt_jax.params import trees
from vpt_jax.training import steps as steps_lib


def _epoch_data(config, epoch: int) -> tuple[np.ndarray, np.ndarray]:
  """Fresh sprites for one epoch: images uint8 (N, S, S, 3), labels int32 (N, A)."""
  data = sprites.generate(config.images_per_epoch, config.data_seed + epoch,
                          image_size=config.image_size, max_objects=1,
                          min_scale=config.min_scale, max_scale=config.max_scale)
  labels = np.stack([data[a] for a in config.attributes], axis=1).astype(np.int32)
  return data["image"], labels


def _initial_state(config, model: vit.VisionTransformer) -> dict:
  """{"backbone": the ViT's parameters, "heads": {attribute: linear head (width, classes)}}."""
  size, _ = vit_variants.decode_variant(config.variant)
  classes = sprites.attribute_num_classes(max_objects=1)
  image = jnp.zeros((1, config.image_size, config.image_size, 3))
  backbone = model.init(jax.random.key(config.init_seed), image,
                        return_features=True)["params"]
  head_keys = jax.random.split(jax.random.key(config.init_seed + 1), len(config.attributes))
  heads = {a: {"kernel": 0.01 * jax.random.normal(k, (size.width, classes[a])),
               "bias": jnp.zeros((classes[a],))}
           for a, k in zip(config.attributes, head_keys)}
  return {"backbone": backbone, "heads": heads}


def _optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and a warmup-cosine schedule over ``total_steps``."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, max(1, int(total_steps * config.warmup_fraction)),
      total_steps)
  return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                     optax.adamw(schedule, weight_decay=config.weight_decay))


def _make_train_step(config, model: vit.VisionTransformer, tx: optax.GradientTransformation):
  """The jitted step: (state, opt_state, images uint8 (B, S, S, 3), labels int32 (B, A))
  -> (state, opt_state, summed loss, accuracies (A,))."""
  mean, std = (0.5,) * 3, (0.5,) * 3  # [-1, 1], as the Google ViTs

  @jax.jit
  def train_step(state, opt_state, images, labels):
    def loss_fn(state):
      features = model.apply({"params": state["backbone"]},
                             normalization_lib.normalize_images(images, mean, std),
                             return_features=True)
      losses, accuracies = [], []
      for i, attribute in enumerate(config.attributes):
        head = state["heads"][attribute]
        logits = features @ head["kernel"] + head["bias"]
        losses.append(steps_lib.cross_entropy(logits, labels[:, i]).mean())
        accuracies.append(jnp.mean(jnp.argmax(logits, -1) == labels[:, i]))
      return sum(losses), jnp.stack(accuracies)
    (loss, accuracies), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss, accuracies
  return train_step


def _train_epoch(config, train_step, state, opt_state, epoch: int, steps_per_epoch: int):
  """One epoch on fresh sprites; returns (state, opt_state, losses, accuracies) per step."""
  images, labels = _epoch_data(config, epoch)
  order = np.random.default_rng([config.shuffle_seed, epoch]).permutation(len(images))
  metrics = []
  for step in range(steps_per_epoch):
    rows = order[step * config.batch_size:(step + 1) * config.batch_size]
    state, opt_state, loss, accuracies = train_step(state, opt_state, images[rows],
                                                    labels[rows])
    metrics.append((loss, accuracies))
  losses, accuracies = zip(*jax.device_get(metrics))
  return state, opt_state, losses, accuracies


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Pretrains and writes the backbone .npz; returns its path."""
  os.makedirs(workdir, exist_ok=True)
  model = vit.VisionTransformer(num_classes=1, variant=config.variant)
  state = _initial_state(config, model)
  steps_per_epoch = config.images_per_epoch // config.batch_size
  tx = _optimizer(config, steps_per_epoch * config.epochs)
  opt_state = tx.init(state)
  train_step = _make_train_step(config, model, tx)

  start = time.perf_counter()
  for epoch in range(config.epochs):
    state, opt_state, losses, accuracies = _train_epoch(config, train_step, state, opt_state,
                                                        epoch, steps_per_epoch)
    print(f"epoch {epoch + 1}/{config.epochs} | loss {np.mean(losses):.3f} | accuracy "
          + ", ".join(f"{a} {v:.3f}" for a, v in
                      zip(config.attributes, np.mean(accuracies, axis=0)))
          + f" | {time.perf_counter() - start:.0f}s", flush=True)
  path = os.path.join(workdir, config.output_name)
  npz_lib.save_npz({k: np.asarray(v) for k, v in
                    trees.flatten(jax.device_get(state["backbone"])).items()}, path)
  print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
  return path
