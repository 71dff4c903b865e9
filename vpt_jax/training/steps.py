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

import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from vpt_jax import errors
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.params import freezing
from vpt_jax.params import trees


# The train-step metric that says whether the new state may be checkpointed.
STATE_FINITE = "state_finite"


def all_finite(*trees) -> jax.Array:
  """int32 () 1 if every floating-point leaf of ``trees`` is finite, else 0.

  One reduction per leaf, of the leaf times zero: the sum is 0 when every
  element is finite and NaN when one is inf or NaN (inf * 0 = NaN). XLA fuses
  the product into the sum, so the check reads the state once; ``all(isfinite)``
  made XLA:CPU write a bool array and reduce it in a second pass (2.4x slower
  over ViT-B/16's AdamW state). Integer leaves (step counters) are always
  finite and skipped.
  """
  flags = [jnp.isfinite(jnp.sum(leaf * jnp.zeros((), leaf.dtype)))
           for leaf in jax.tree.leaves(trees) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  if not flags:
    return jnp.ones([], jnp.int32)
  return jnp.all(jnp.stack(flags)).astype(jnp.int32)


def model_inputs(batch, mean, std) -> tuple:
  """(model input, extra apply kwargs) of a batch: normalised images or cached features."""
  if "features" in batch:
    return batch["features"], {"from_features": True}
  return normalization_lib.normalize_images(batch["image"], mean, std), {}


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


def split_micro_batches(batch, num_micro: int) -> dict:
  """Leaves (B, ...) -> (num_micro, B // num_micro, ...); micro-batch i holds rows i, i + k, ...

  Strided, not contiguous: when the rows are sharded over devices in blocks of
  B / devices with (B / devices) % k == 0, every device's block holds the same
  number of rows of each micro-batch, so each micro-batch stays spread over all
  devices and nothing moves between them.
  """
  def split(x):
    rows = x.shape[0]
    return jnp.swapaxes(x.reshape((rows // num_micro, num_micro) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def check_accumulation(accumulation_steps: int, batch_size: Optional[int] = None, *,
                       batch_norm: bool = False) -> None:
  """Raises ValueError unless k >= 1 is an integer that can split the step.

  k must divide ``batch_size`` (if given), and k > 1 cannot be used with a
  BatchNorm head (``batch_norm``): each micro-batch would be normalised with
  its own statistics, not the batch's.
  """
  if (isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, numbers.Integral)
      or accumulation_steps < 1):
    raise errors.UserError(f"optim.accumulation_steps must be an integer >= 1 (1 = off), got "
                           f"{accumulation_steps!r}")
  if batch_size is not None and batch_size % accumulation_steps:
    raise errors.UserError(
        f"batch size {batch_size} is not divisible by optim.accumulation_steps="
        f"{accumulation_steps}; use a batch size that is a multiple of it, or a divisor of "
        f"{batch_size} as accumulation_steps")
  if batch_norm and accumulation_steps > 1:
    raise errors.UserError(
        f"optim.accumulation_steps={accumulation_steps} cannot be used with a BatchNorm "
        "head (mlp-k): each micro-batch would be normalised with its own statistics, which "
        "is not the step of the whole batch; set optim.accumulation_steps=1 (head-only "
        "methods train on cached features and need little memory)")


def make_train_step(model, labels, tx: optax.GradientTransformation,
                    learning_rate: optax.Schedule, *, mean, std,
                    accumulation_steps: int = 1) -> Callable:
  """Returns train_step(state, batch, rng) -> (state, metrics).

  Args:
    model: the Linen model; called with ``train=True`` and a "dropout" rng.
    labels: "train"/"frozen" tree matching ``state["params"]``.
    tx: the partitioned optimizer over the whole tree.
    learning_rate: the schedule (for the logged lr).
    mean, std: input normalisation (3,) each.
    accumulation_steps: k >= 1. With k > 1 the batch of B rows is split into
      k micro-batches of B / k (``split_micro_batches``) that run one after the
      other in a ``lax.scan``; the mean of their gradients, which is the
      gradient of the whole batch's mean loss, feeds one optimizer update. So
      the step equals the k = 1 step on the same batch up to float summation
      order, with the activation memory of B / k rows. Micro-batch i draws
      dropout with fold_in(step rng, i). Models with BatchNorm ("batch_stats",
      the MLP-k heads) are refused: their batch statistics would be those of
      the micro-batch, not of the batch.

  The batch holds "image" (or "features") and "label" (see the module
  docstring); the rng for the step is fold_in(rng, step), so a resumed run
  draws the same masks. With "batch_stats" in the state, BatchNorm normalises
  with the batch's statistics and the state's running averages are updated.
  Metrics: mean loss and accuracy over the whole batch, the learning rate, the
  norm of the (whole-batch) gradient of the trainable leaves and
  ``STATE_FINITE`` (``all_finite`` of the new state's trainable leaves,
  optimizer state and batch_stats: what a checkpoint would hold).
  """
  check_accumulation(accumulation_steps)

  def train_step(state, batch, rng):
    trainable, frozen = freezing.split(state["params"], labels)
    dropout_rng = jax.random.fold_in(rng, state["step"])
    grad_fn = jax.value_and_grad(_loss_fn(model, frozen, state, mean=mean, std=std),
                                 has_aux=True)
    if accumulation_steps == 1:
      (loss, (correct, updated)), grads = grad_fn(trainable, batch, dropout_rng)
    else:
      check_accumulation(accumulation_steps, batch["label"].shape[0],
                         batch_norm="batch_stats" in state)
      loss, correct, grads = _accumulated_gradients(grad_fn, trainable, batch, dropout_rng,
                                                    accumulation_steps)
      updated = {}
    new_trainable, opt_state = _apply_updates(tx, state, grads, trainable, frozen)
    params = freezing.merge(new_trainable, frozen)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(correct),
        "learning_rate": learning_rate(state["step"]),
        "grad_norm": optax.tree.norm(grads),  # trainable gradients only
        # The loss can be finite while the update already overflowed the weights.
        STATE_FINITE: all_finite(new_trainable, opt_state, updated),
    }
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 **updated}  # the new batch_stats, if any
    return new_state, metrics
  return train_step


def _loss_fn(model, frozen: dict, state: dict, *, mean, std) -> Callable:
  """(trainable, batch, rng) -> (mean loss, (correct (B,), updated batch_stats or {}))."""
  has_stats = "batch_stats" in state

  def loss_fn(trainable_params, micro_batch, micro_rng):
    inputs, input_kwargs = model_inputs(micro_batch, mean, std)
    variables = {"params": freezing.merge(trainable_params, frozen)}
    if has_stats:
      variables["batch_stats"] = state["batch_stats"]
    outputs = model.apply(variables, inputs, train=True, rngs={"dropout": micro_rng},
                          mutable=["batch_stats"] if has_stats else False, **input_kwargs)
    logits, updated = outputs if has_stats else (outputs, {})
    correct = jnp.argmax(logits, -1) == micro_batch["label"]
    return cross_entropy(logits, micro_batch["label"]).mean(), (correct, updated)
  return loss_fn


def _accumulated_gradients(grad_fn, trainable: dict, batch, rng, accumulation_steps: int):
  """(mean loss, correct (B,), mean gradient) of k micro-batches run in a ``lax.scan``.

  Micro-batch i draws dropout with fold_in(rng, i); equal micro-batches make the
  batch's mean loss the mean of the micro-batch means, and likewise the gradient.
  """
  def accumulate(grad_sum, micro):
    index, micro_batch = micro
    (micro_loss, (micro_correct, _)), micro_grads = grad_fn(
        trainable, micro_batch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, grad_sum, micro_grads), (micro_loss, micro_correct)

  grad_sum, (micro_losses, correct) = jax.lax.scan(
      accumulate, jax.tree.map(jnp.zeros_like, trainable),
      (jnp.arange(accumulation_steps), split_micro_batches(batch, accumulation_steps)))
  grads = jax.tree.map(lambda g: g / accumulation_steps, grad_sum)
  return micro_losses.mean(), correct, grads


def _apply_updates(tx, state: dict, grads: dict, trainable: dict, frozen: dict):
  """(new trainable leaves, new optimizer state): the optimizer's update of ``trainable``."""
  # Frozen leaves get constant zeros that set_to_zero never reads.
  zeros = {path: jnp.zeros_like(value) for path, value in frozen.items()}
  updates, opt_state = tx.update(freezing.merge(grads, zeros), state["opt_state"],
                                 state["params"])
  flat_updates = trees.flatten(updates)
  new_trainable = {path: value + flat_updates[path].astype(value.dtype)
                   for path, value in trainable.items()}
  return new_trainable, opt_state


def make_eval_step(model, *, mean, std, per_example: bool = False) -> Callable:
  """Returns eval_step(variables, batch) -> sums over the real (mask=True) examples.

  ``variables`` are ``model_variables(state)`` ({"params"} and, for BatchNorm
  heads, the running averages in "batch_stats"). The batch holds "image" (or
  "features"), "label" and "mask" bool (B,); padded rows count nowhere. With
  ``per_example`` the result also holds "per_example": {"logits" (B, C),
  "label" (B,), "mask" (B,)} (evaluation keeps the real rows; not summed).
  """
  def eval_step(variables, batch):
    inputs, input_kwargs = model_inputs(batch, mean, std)
    logits = model.apply(variables, inputs, train=False, **input_kwargs)
    mask = batch["mask"].astype(jnp.float32)
    sums = {
        "count": mask.sum(),
        "correct_top1": (topk_correct(logits, batch["label"], 1) * mask).sum(),
        "correct_top5": (topk_correct(logits, batch["label"], 5) * mask).sum(),
        "loss_sum": (cross_entropy(logits, batch["label"]) * mask).sum(),
    }
    if per_example:
      sums["per_example"] = {"logits": logits, "label": batch["label"], "mask": batch["mask"]}
    return sums
  return eval_step


def summarize_eval(totals: dict) -> dict:
  """Sums from ``eval_step`` -> top-1, top-5 accuracy and mean loss."""
  count = max(float(totals["count"]), 1.0)
  return {"top1": float(totals["correct_top1"]) / count,
          "top5": float(totals["correct_top5"]) / count,
          "loss": float(totals["loss_sum"]) / count,
          "count": int(totals["count"])}
