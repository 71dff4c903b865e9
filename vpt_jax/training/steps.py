"""Pure, jit-able training and evaluation steps over plain pytrees.

The train state is a plain dict ``{"step", "params", "opt_state"}`` whose
``params`` hold the whole model, plus ``"batch_stats"`` when the model has
BatchNorm running averages (the MLP-k heads); gradients are taken only with
respect to the trainable leaves, so XLA never computes frozen weight gradients.

A batch holds either "image" uint8 (B, H, W, 3) or, for head-only methods
trained on cached backbone features, "features" float32 (B, D); either way
"label" int32 (B,).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vpt_jax.training import partition


def normalize_images(images, mean, std):
  """uint8 (B, H, W, 3) -> float32 ((x / 255) - mean) / std."""
  images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def model_inputs(batch, mean, std) -> tuple:
  """(model input, extra apply kwargs) of a batch: normalised images or cached features."""
  if "features" in batch:
    return batch["features"], {"from_features": True}
  return normalize_images(batch["image"], mean, std), {}


def model_variables(state) -> dict:
  """The Flax variables of a train state: params, and batch_stats when present."""
  return {k: state[k] for k in ("params", "batch_stats") if k in state}


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy. (B, C), (B,) -> (B,)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def topk_correct(logits, labels, k: int):
  """Whether the label is among the k largest logits. (B, C), (B,) -> bool (B,)."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1)


def make_train_step(model, labels, tx: optax.GradientTransformation,
                    learning_rate: optax.Schedule, *, mean, std) -> Callable:
  """Returns train_step(state, batch, rng) -> (state, metrics).

  Args:
    model: the Linen model; called with ``train=True`` and a "dropout" rng.
    labels: "train"/"frozen" tree matching ``state["params"]``.
    tx: the partitioned optimizer over the whole tree.
    learning_rate: the schedule (for the logged lr).
    mean, std: input normalisation (3,) each.

  The batch holds "image" (or "features") and "label" (see the module
  docstring); the rng for the step is fold_in(rng, step), so a resumed run
  draws the same masks. With "batch_stats" in the state, BatchNorm normalises
  with the batch's statistics and the state's running averages are updated.
  """
  def train_step(state, batch, rng):
    inputs, input_kwargs = model_inputs(batch, mean, std)
    trainable, frozen = partition.split(state["params"], labels)
    dropout_rng = jax.random.fold_in(rng, state["step"])
    has_stats = "batch_stats" in state

    def loss_fn(trainable_params):
      variables = {"params": partition.merge(trainable_params, frozen)}
      if has_stats:
        variables["batch_stats"] = state["batch_stats"]
      outputs = model.apply(variables, inputs, train=True, rngs={"dropout": dropout_rng},
                            mutable=["batch_stats"] if has_stats else False, **input_kwargs)
      logits, updated = outputs if has_stats else (outputs, {})
      return cross_entropy(logits, batch["label"]).mean(), (logits, updated)

    (loss, (logits, updated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    # Frozen leaves get constant zeros that set_to_zero never reads.
    zeros = {path: jnp.zeros_like(value) for path, value in frozen.items()}
    updates, opt_state = tx.update(partition.merge(grads, zeros), state["opt_state"],
                                   state["params"])
    flat_updates = partition.flatten(updates)
    new_trainable = {path: value + flat_updates[path].astype(value.dtype)
                     for path, value in trainable.items()}
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "learning_rate": learning_rate(state["step"]),
        "grad_norm": optax.tree.norm(grads),  # trainable gradients only
    }
    new_state = {"step": state["step"] + 1,
                 "params": partition.merge(new_trainable, frozen),
                 "opt_state": opt_state,
                 **updated}  # the new batch_stats, if any
    return new_state, metrics
  return train_step


def make_eval_step(model, *, mean, std) -> Callable:
  """Returns eval_step(variables, batch) -> sums over the real (mask=True) examples.

  ``variables`` are ``model_variables(state)`` ({"params"} and, for BatchNorm
  heads, the running averages in "batch_stats"). The batch holds "image" (or
  "features"), "label" and "mask" bool (B,); padded rows count nowhere.
  """
  def eval_step(variables, batch):
    inputs, input_kwargs = model_inputs(batch, mean, std)
    logits = model.apply(variables, inputs, train=False, **input_kwargs)
    mask = batch["mask"].astype(jnp.float32)
    return {
        "count": mask.sum(),
        "correct_top1": (topk_correct(logits, batch["label"], 1) * mask).sum(),
        "correct_top5": (topk_correct(logits, batch["label"], 5) * mask).sum(),
        "loss_sum": (cross_entropy(logits, batch["label"]) * mask).sum(),
    }
  return eval_step


def summarize_eval(totals: dict) -> dict:
  """Sums from ``eval_step`` -> top-1, top-5 accuracy and mean loss."""
  count = max(float(totals["count"]), 1.0)
  return {"top1": float(totals["correct_top1"]) / count,
          "top5": float(totals["correct_top5"]) / count,
          "loss": float(totals["loss_sum"]) / count,
          "count": int(totals["count"])}
