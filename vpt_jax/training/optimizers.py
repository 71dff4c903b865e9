"""Optimizers and learning-rate schedules of the VPT reference (vpt.md 5.1-5.4).

* SGD, momentum 0.9, coupled L2 weight decay (added to the gradient before the
  momentum, PyTorch style) on every trainable tensor except the head's bias.
* AdamW as the reference's Full baseline uses it (HF-style: eps outside the
  bias correction, decoupled decay applied to the already-updated weights,
  0.01 on non-bias parameters).
* ``torch_adamw``: torch.optim.AdamW as CVPT's reference uses it (through
  timm's ``create_optimizer_v2`` on a plain parameter list, cvpt.md 1.6-1.7):
  betas (0.9, 0.999), eps 1e-8 added to sqrt(v_hat), decoupled decay
  theta <- theta - lr * wd * theta with ``weight_decay`` (0.05 in CVPT) on every
  trainable tensor, biases and the head included.
* ``timm_adamw``: the same torch AdamW through timm's ``create_optimizer_v2``
  with its default ``filter_bias_and_bn``, as SSF trains: no decay on what is
  1-D in PyTorch (biases, LayerNorm and SSF scales/shifts; our q/k/v biases
  are (H, D/H)) and none on biases.
* lr = base_lr * batch / 256; linear warmup then cosine to zero, evaluated per
  epoch (the reference steps its scheduler once per epoch, so epoch 0 trains
  at lr 0) or per step.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from vpt_jax import errors
from vpt_jax.params.freezing import FROZEN, TRAIN

SCHEDULE_UNITS = ("epoch", "step")
OPTIMIZERS = ("sgd", "adamw", "torch_adamw", "timm_adamw")
# Leaves timm's param_groups_weight_decay leaves undecayed besides 1-D ones.
_TIMM_NO_DECAY = ("bias", "scale", "shift")
# The reference's AdamW hard-codes this decay and ignores SOLVER.WEIGHT_DECAY.
ADAMW_WEIGHT_DECAY = 0.01


def scaled_learning_rate(base_lr: float, batch_size: int) -> float:
  """The reference's linear scaling rule: base_lr * batch / 256."""
  return base_lr * batch_size / 256.0


def warmup_cosine_multiplier(epoch, warmup_epochs: float, total_epochs: float):
  """m(e) = e / W for e < W, else 0.5 * (1 + cos(pi * (e - W) / (T - W))), floored at 0."""
  epoch = jnp.asarray(epoch, jnp.float32)
  warm = epoch / max(warmup_epochs, 1e-12)
  progress = (epoch - warmup_epochs) / max(total_epochs - warmup_epochs, 1e-12)
  cosine = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * jnp.minimum(progress, 1.0))))
  return jnp.where(epoch < warmup_epochs, warm, cosine)


def make_schedule(peak_lr: float, *, warmup_epochs: float, total_epochs: float,
                  steps_per_epoch: float, unit: str = "epoch") -> optax.Schedule:
  """Learning rate as a function of the step.

  Args:
    peak_lr: the already batch-scaled learning rate.
    warmup_epochs, total_epochs: W and T of the multiplier.
    steps_per_epoch: examples per epoch / global batch (may be fractional).
    unit: "epoch" evaluates the multiplier at the integer epoch of the step
      (the reference); "step" at the fractional epoch (smooth).
  """
  if unit not in SCHEDULE_UNITS:
    raise errors.UserError(f"schedule unit must be one of {SCHEDULE_UNITS}, got {unit!r}")

  def schedule(step):
    epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
    if unit == "epoch":
      # Tiny slack so that step * B / N landing exactly on an integer is not lost
      # to float rounding.
      epoch = jnp.floor(epoch + 1e-6)
    return peak_lr * warmup_cosine_multiplier(epoch, warmup_epochs, total_epochs)
  return schedule


def path_name(key_path) -> str:
  """A jax key path of nested dicts -> "a/b/c"."""
  return "/".join(str(getattr(k, "key", k)) for k in key_path)


def map_with_path_names(fn, tree, *rest):
  """tree_map whose fn receives the "/"-joined path first."""
  return jax.tree_util.tree_map_with_path(
      lambda key_path, *leaves: fn(path_name(key_path), *leaves), tree, *rest)


def decay_mask_fn(predicate: Callable[[str], bool]):
  """A callable optax mask: True where predicate(path) holds.

  Callable (not a fixed tree) because optax.partition hands each inner
  transformation a tree with its other leaves replaced by empty MaskedNodes.
  """
  return lambda params: map_with_path_names(lambda path, _: predicate(path), params)


def is_head_output_bias(path: str) -> bool:
  """The reference skips weight decay only on the head's last-layer bias."""
  return path == "head/bias"


def is_bias(path: str) -> bool:
  """AdamW in the reference decays every parameter whose name lacks "bias"."""
  return "bias" in path.rsplit("/", 1)[-1]


class HFAdamWState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_hf_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6):
  """HuggingFace AdamW's step direction: bias-corrected step size, eps added to sqrt(nu).

  update = sqrt(1 - b2^t) / (1 - b1^t) * mu / (sqrt(nu) + eps)  (to be scaled by -lr).
  """
  def init(params):
    zeros = lambda p: jnp.zeros_like(p)
    return HFAdamWState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                        jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    t = count.astype(jnp.float32)
    step_size = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    direction = jax.tree.map(lambda m, v: step_size * m / (jnp.sqrt(v) + eps), mu, nu)
    return direction, HFAdamWState(count, mu, nu)
  return optax.GradientTransformation(init, update)


def hf_adamw(learning_rate: optax.Schedule, weight_decay: float,
             decays: Callable[[str], bool]) -> optax.GradientTransformation:
  """theta' = (theta - lr * adam) * (1 - lr * wd) where decays(path), as HF AdamW.

  Written as one update: -lr * adam - lr * wd * (theta - lr * adam).
  """
  adam = scale_by_hf_adam()

  def init(params):
    return adam.init(params)

  def update(updates, state, params):
    direction, state = adam.update(updates, state)
    lr = learning_rate(state.count - 1)
    def leaf_update(path, d, p):
      step = -lr * d
      return step - lr * weight_decay * (p + step) if decays(path) else step
    return map_with_path_names(leaf_update, direction, params), state
  return optax.GradientTransformation(init, update)


def make_optimizer(labels, *, name: str, learning_rate: optax.Schedule,
                   weight_decay, momentum: float = 0.9,
                   decay: Optional[bool] = None) -> optax.GradientTransformation:
  """The optimizer over the whole parameter tree, partitioned by label.

  Trainable leaves get the method's optimizer; frozen leaves get
  ``optax.set_to_zero()`` and hold no optimizer state.

  Args:
    labels: same structure, "train" / "frozen" per leaf.
    name: "sgd" (coupled L2 except the head bias), "adamw" (HF AdamW, decay
      0.01 on non-bias leaves, like the reference; ``weight_decay`` ignored
      unless 0, in which case the reference falls back to plain SGD) or
      "torch_adamw" (torch.optim.AdamW, ``weight_decay`` on every leaf) or
      "timm_adamw" (the same, no decay on biases, scales, shifts, 1-D leaves).
    learning_rate: schedule of the step.
    weight_decay: L2 coefficient for SGD; a float, or a traced scalar when one
      compiled program trains several settings (``sweeps``, which then passes
      ``decay``).
    decay: whether the optimizer has a weight-decay term; None means
      ``weight_decay != 0``. True with a zero ``weight_decay`` adds 0 * theta,
      which leaves every update unchanged.
  """
  if name not in OPTIMIZERS:
    raise errors.UserError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
  if decay is None:
    decay = weight_decay != 0
  if name == "torch_adamw":
    # optax.adamw decays with the pre-step weights, as torch's p *= 1 - lr * wd does.
    inner = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
  elif name == "timm_adamw":
    mask = lambda params: map_with_path_names(
        lambda path, leaf: leaf.ndim > 1 and path.rsplit("/", 1)[-1] not in _TIMM_NO_DECAY,
        params)
    inner = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                        mask=mask)
  elif name == "adamw" and decay:
    inner = hf_adamw(learning_rate, ADAMW_WEIGHT_DECAY, lambda p: not is_bias(p))
  else:
    l2 = []
    if decay:
      l2.append(optax.add_decayed_weights(
          weight_decay, mask=decay_mask_fn(lambda p: not is_head_output_bias(p))))
    inner = optax.chain(*l2, optax.sgd(learning_rate, momentum=momentum))
  return optax.partition({TRAIN: inner, FROZEN: optax.set_to_zero()}, labels)
