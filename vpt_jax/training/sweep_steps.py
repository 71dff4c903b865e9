"""The vmapped step of a sweep: S lr x weight-decay settings as one compiled program.

``jax.vmap`` maps the library's own ``steps.make_train_step`` over a leading
settings axis of size S carried by the trainable parameters, their optimizer
state and BatchNorm running averages, and by the per-setting hyper-parameters
(peak lr and weight decay as traced values, so one compiled program serves
any S settings). The frozen parameters, the batch and the dropout rng are
shared (``in_axes=None``): XLA reads each backbone weight once per step for
all settings, and whatever depends on no per-setting value (the input
normalisation and patch embedding; for head-only methods the whole backbone)
is computed once. Pure functions over plain pytrees; ``sweeps`` runs them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpt_jax.methods import registry
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import optimizers
from vpt_jax.training import steps as steps_lib


def optimizer_name(config) -> str:
  """The run's optimizer: ``optim.name`` or the method's default."""
  return config.optim.name or registry.get_method(config.method).optimizer


def setting_hparams(configs: Sequence[ml_collections.ConfigDict]) -> dict:
  """{"peak_lr": float32 (S,), "weight_decay": float32 (S,)} of the settings.

  The peak lr is ``base_lr * batch / 256`` computed in Python, then rounded
  to float32, exactly as a separate run's constant is.
  """
  return {
      "peak_lr": np.asarray([optimizers.scaled_learning_rate(c.optim.base_lr,
                                                             c.optim.batch_size)
                             for c in configs], np.float32),
      "weight_decay": np.asarray([c.optim.weight_decay for c in configs], np.float32),
  }


def make_setting_optimizer(config, labels, steps_per_epoch: float,
                           decay: bool) -> Callable:
  """Returns make(peak_lr, weight_decay) -> (tx, schedule) for traced scalars.

  The same schedule and optimizer as ``setup.build_runs`` builds from constants;
  ``decay`` is whether the program has a weight-decay term (True if any fused
  setting decays: a zero decay then adds 0 * theta, which changes nothing).
  """
  name = optimizer_name(config)

  def make(peak_lr, weight_decay):
    schedule = optimizers.make_schedule(
        peak_lr, warmup_epochs=config.optim.warmup_epochs,
        total_epochs=config.optim.epochs, steps_per_epoch=steps_per_epoch,
        unit=config.optim.schedule_unit)
    tx = optimizers.make_optimizer(labels, name=name, learning_rate=schedule,
                                   weight_decay=weight_decay,
                                   momentum=config.optim.momentum, decay=decay)
    return tx, schedule
  return make


def state_axes(state, labels) -> dict:
  """vmap axes of a fused state: 0 for per-setting leaves, None for shared ones.

  Shared: the step and the frozen parameters. Per setting: the trainable
  parameters, the optimizer state and the BatchNorm running averages.
  """
  flat_labels = trees.flatten(labels)
  axes = {"step": None,
          "params": trees.unflatten({p: 0 if label == freezing.TRAIN else None
                                         for p, label in flat_labels.items()}),
          "opt_state": 0}
  if "batch_stats" in state:
    axes["batch_stats"] = 0
  return axes


def stack_states(states: Sequence[dict], labels) -> dict:
  """S trainer states (same step, same frozen params) -> one fused state.

  Trainable leaves, optimizer state and batch_stats get a leading axis of
  size S; the step and the frozen leaves are taken from ``states[0]``.
  """
  trainable = [freezing.split(s["params"], labels)[0] for s in states]
  _, frozen = freezing.split(states[0]["params"], labels)
  stack = lambda *leaves: jnp.stack(leaves)
  fused = {"step": states[0]["step"],
           "params": freezing.merge(jax.tree.map(stack, *trainable), frozen),
           "opt_state": jax.tree.map(stack, *[s["opt_state"] for s in states])}
  if "batch_stats" in states[0]:
    fused["batch_stats"] = jax.tree.map(stack, *[s["batch_stats"] for s in states])
  return fused


def unstack_state(fused_state: dict, labels, index) -> dict:
  """Setting ``index`` of a fused state, as a plain trainer state."""
  def select(axis, subtree):
    return subtree if axis is None else jax.tree.map(lambda x: x[index], subtree)
  return jax.tree.map(select, state_axes(fused_state, labels), fused_state,
                      is_leaf=lambda x: x is None)


def restructure(tree, treedef):
  """``tree``'s leaves, in order, in the structure ``treedef``.

  A separate run's optimizer has no weight-decay transformation when its decay
  is 0, a fused program has one (stateless) when any setting decays: the two
  optimizer states hold the same arrays in differently nested tuples.
  """
  leaves = jax.tree.leaves(tree)
  if len(leaves) != treedef.num_leaves:
    raise ValueError(f"cannot put {len(leaves)} optimizer-state arrays into a structure "
                     f"of {treedef.num_leaves}: {treedef}")
  return jax.tree.unflatten(treedef, leaves)


def make_fused_train_step(model, labels, make_setting_tx: Callable, *, mean, std,
                          accumulation_steps: int = 1) -> Callable:
  """Returns fused_step(state, hparams, batch, rng) -> (state, metrics).

  Args:
    model, labels, mean, std, accumulation_steps: as for ``steps.make_train_step``.
    make_setting_tx: ``make_setting_optimizer(...)``.

  ``state`` is a ``stack_states`` state, ``hparams`` a ``setting_hparams``
  dict (S,) each; the batch and rng are those of one ordinary step, shared by
  every setting. Each metric comes back with shape (S,).
  """
  def fused_step(state, hparams, batch, rng):
    def one_setting(setting_state, setting_hparams):
      tx, schedule = make_setting_tx(setting_hparams["peak_lr"],
                                     setting_hparams["weight_decay"])
      step = steps_lib.make_train_step(model, labels, tx, schedule, mean=mean, std=std,
                                       accumulation_steps=accumulation_steps)
      return step(setting_state, batch, rng)
    axes = state_axes(state, labels)
    return jax.vmap(one_setting, in_axes=(axes, 0), out_axes=(axes, 0))(state, hparams)
  return fused_step


def make_fused_eval_step(model, labels, *, mean, std, per_example: bool = False) -> Callable:
  """Returns eval_step(variables, batch) -> ``steps.make_eval_step``'s sums, (S,) each.

  ``variables`` are ``steps.model_variables`` of a fused state: every setting
  is scored on the same (shared) batch. ``per_example``: as in
  ``make_eval_step``, with a leading settings axis (S, B, ...).
  """
  eval_step = steps_lib.make_eval_step(model, mean=mean, std=std, per_example=per_example)

  def fused_eval_step(variables, batch):
    axes = {k: v for k, v in state_axes(variables, labels).items() if k in variables}
    return jax.vmap(lambda setting: eval_step(setting, batch), in_axes=(axes,))(variables)
  return fused_eval_step

