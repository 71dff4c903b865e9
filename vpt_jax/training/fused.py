"""Several learning-rate x weight-decay settings of one run in one compiled program.

The tuning protocol (``protocol/tuning.py``) trains up to 40 settings of the
same task on the same frozen backbone; they differ only in
``optim.base_lr`` and ``optim.weight_decay``. Here S of them train together:
``jax.vmap`` maps the library's own ``steps.make_train_step`` over a leading
settings axis of size S carried by the trainable parameters, their optimizer
state and BatchNorm running averages, and by the per-setting hyper-parameters
(peak lr and weight decay as traced values, so one compiled program serves
any S settings). The frozen parameters, the batch and the dropout rng are
shared (``in_axes=None``): XLA reads each backbone weight once per step for
all settings, and whatever depends on no per-setting value (the input
normalisation and patch embedding; for head-only methods the whole backbone)
is computed once.

Every setting sees what its separate run sees: the same batches (the data
order is a function of the seed and the step), the same dropout masks (the
rng is fold_in(key(seed + 1), step)), the same initial parameters and the same
optimizer arithmetic. It ends with the parameters of
``trainer.train_and_evaluate`` on its own config up to float rounding: vmap
turns the per-setting matmuls into batched ones whose summation order the
compiler may choose differently (tests/test_fused.py: within 1e-5).

Each setting keeps its own folder, laid out like a separate run's
(config.json, metrics.jsonl, checkpoints/ in a separate run's layout,
results.json, export/), so the protocol's records, the report and a resume,
fused or not, read it as usual. The data, the model and the backbone are
loaded once; evaluation scores every setting in one pass over each split. A
setting whose loss becomes non-finite stops being logged and checkpointed at
the step a separate run would stop, and is returned as the
``FloatingPointError`` the separate run would raise; the others go on.
Settings restored at different steps (e.g. after a resume) train in one
program per step.

Cost: S settings hold S copies of the trainable parameters, optimizer state
and activations (like an S times larger batch), one copy of the backbone.
Head-only methods on cached features (linear, mlp-k) and BatchNorm heads work
as in the trainer.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpt_jax.checkpoints import train_state as ckpt_lib
from vpt_jax.methods import registry
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.training import optimizers
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import steps as steps_lib
from vpt_jax.training import trainer

# The only config fields in which fused settings may differ.
FUSABLE_FIELDS = ("optim.base_lr", "optim.weight_decay")
# What a fused run returns per setting: results.json's dict, or the error of a
# diverged run.
Outcome = Union[dict, FloatingPointError]


def optimizer_name(config) -> str:
  """The run's optimizer: ``optim.name`` or the method's default."""
  return config.optim.name or registry.get_method(config.method).optimizer


def structure_key(config) -> tuple:
  """What must agree between fused settings besides their configs' other fields.

  The reference's AdamW ("adamw") falls back to plain SGD when weight_decay is
  0, so those settings need a different program from the non-zero ones.
  """
  if optimizer_name(config) == "adamw":
    return ("adamw", config.optim.weight_decay != 0)
  return (optimizer_name(config),)


def check_fusable(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises ``trainer.ConfigError`` unless the configs can train in one program.

  They must differ in nothing but ``FUSABLE_FIELDS`` and share one
  ``structure_key``.
  """
  if not configs:
    raise trainer.ConfigError("no settings to fuse; pass at least one config")
  flats = [trainer.config_fields(c) for c in configs]
  keys = sorted(set().union(*flats))
  differing = [k for k in keys if k not in FUSABLE_FIELDS
               and any(f.get(k) != flats[0].get(k) for f in flats[1:])]
  if differing:
    details = "; ".join(
        f"{k}: {', '.join(repr(f.get(k)) for f in flats)}" for k in differing[:5])
    raise trainer.ConfigError(
        f"settings trained in one program may differ only in {', '.join(FUSABLE_FIELDS)}, "
        f"but these fields differ too: {details}"
        + (" ..." if len(differing) > 5 else "")
        + ". Train them in separate groups (or one by one).")
  structures = {structure_key(c) for c in configs}
  if len(structures) > 1:
    raise trainer.ConfigError(
        "with optim.name 'adamw' the reference trains plain SGD when weight_decay is 0, "
        "so settings with weight_decay 0 and non-zero cannot share one program; "
        "group them separately (group_settings does)")


def group_settings(configs: Sequence[ml_collections.ConfigDict], size: int) -> list[list[int]]:
  """Indices of ``configs`` in groups of at most ``size`` that can share a program.

  Keeps the given order within each group; configs are assumed to differ only
  in ``FUSABLE_FIELDS`` (``check_fusable`` checks each group).
  """
  if size < 1:
    raise ValueError(f"group size must be >= 1, got {size}")
  by_structure: dict[tuple, list[int]] = {}
  for index, config in enumerate(configs):
    by_structure.setdefault(structure_key(config), []).append(index)
  return [indices[start:start + size] for indices in by_structure.values()
          for start in range(0, len(indices), size)]


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

  The same schedule and optimizer as ``trainer.setup`` builds from constants;
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


def make_fused_eval_step(model, labels, *, mean, std) -> Callable:
  """Returns eval_step(variables, batch) -> ``steps.make_eval_step``'s sums, (S,) each.

  ``variables`` are ``steps.model_variables`` of a fused state: every setting
  is scored on the same (shared) batch.
  """
  eval_step = steps_lib.make_eval_step(model, mean=mean, std=std)

  def fused_eval_step(variables, batch):
    axes = {k: v for k, v in state_axes(variables, labels).items() if k in variables}
    return jax.vmap(lambda setting: eval_step(setting, batch), in_axes=(axes,))(variables)
  return fused_eval_step


# ----------------------------------------------------------------- running settings

def setup(configs: Sequence[ml_collections.ConfigDict],
          workdirs: Sequence[str]) -> list[trainer.Run]:
  """One ``trainer.Run`` per setting, sharing data, model and frozen parameters.

  ``trainer.setup``'s checks for each config (config.json included), then
  ``trainer.setup_runs``: the data is decoded, the model built and the
  backbone loaded once; every run's state holds the same frozen arrays.
  """
  check_fusable(configs)
  if len(set(workdirs)) != len(workdirs) or len(workdirs) != len(configs):
    raise trainer.ConfigError(f"need one distinct workdir per setting, got {list(workdirs)}")
  for config in configs:
    trainer.validate_config(config)
  for config, workdir in zip(configs, workdirs):
    trainer.prepare_workdir(workdir)
    trainer.check_resume_config(workdir, config)
  return trainer.setup_runs(configs, workdirs)


def _setting_name(config) -> str:
  return f"lr {config.optim.base_lr:g} wd {config.optim.weight_decay:g}"


def _fused_eval_step(run: trainer.Run):
  replicated = mesh_lib.replicated(run.mesh)
  return jax.jit(make_fused_eval_step(run.model, run.labels, **run.norm),
                 in_shardings=(replicated, mesh_lib.batch_sharded(run.mesh)),
                 out_shardings=replicated)


def evaluate(run: trainer.Run, eval_step, variables, split: str) -> list[dict]:
  """``trainer.evaluate`` for every setting in one pass over the split.

  Args:
    eval_step: a jitted ``make_fused_eval_step``.
    variables: ``steps.model_variables`` of a fused state.

  Returns:
    Per setting {"top1", "top5", "loss", "count"}.
  """
  totals = trainer.eval_totals(run, eval_step, variables, split)
  return [steps_lib.summarize_eval({k: v[index] for k, v in totals.items()})
          for index in range(len(totals["count"]))]


def train(runs: Sequence[trainer.Run]) -> tuple[dict, dict[int, FloatingPointError]]:
  """Trains ``runs`` (one per setting, all at the same step) to the end together.

  Logs, evaluates (``eval.every_epochs``) and checkpoints each setting in its
  own folder as ``trainer.train`` would, and sets each run's ``state`` to its
  final state.

  Returns:
    (variables, diverged): ``steps.model_variables`` of the final fused state
    (for ``finish``), and {position in ``runs``: the error} for the settings
    whose loss became non-finite (their checkpoints stop at the last finite
    window, as a separate run's do).

  Raises:
    trainer.Preempted: after saving every setting, on a preemption notice.
  """
  first = runs[0]
  config, mesh, labels = first.config, first.mesh, first.labels
  start_step = first.step
  if any(run.step != start_step for run in runs):
    raise trainer.ConfigError(f"fused runs must start at one step, got "
                              f"{[run.step for run in runs]}")
  replicated = mesh_lib.replicated(mesh)
  first.writer.print(trainer.parameter_overview(
      first.state["params"], labels, trainer.backbone_size(
          first.state["params"], registry.get_method(config.method).fresh_patterns)))
  first.writer.print(
      f"{len(runs)} settings in one program ({', '.join(_setting_name(r.config) for r in runs)}"
      f"): {len(first.data.labels)} training images, batch {config.optim.batch_size}, "
      f"{first.total_steps} steps on {mesh.devices.size} device(s)"
      + (f"; resuming at step {start_step}" if start_step else ""))
  features = None
  if trainer.uses_cached_features(config, labels) and start_step < first.total_steps:
    features = trainer.compute_features(
        first.model, steps_lib.model_variables(first.state), first.data.images, mesh,
        batch_size=config.eval.batch_size, norm=first.norm)
  hparams = setting_hparams([run.config for run in runs])
  make_tx = make_setting_optimizer(
      config, labels, first.steps_per_epoch,
      decay=any(run.config.optim.weight_decay != 0 for run in runs))
  # Checkpoints keep each setting's own optimizer-state structure (a separate
  # run can resume them); the program uses the group's.
  own_structures = [jax.tree.structure(run.state["opt_state"]) for run in runs]
  group_tx, _ = make_tx(hparams["peak_lr"][0], hparams["weight_decay"][0])
  group_structure = jax.tree.structure(jax.eval_shape(group_tx.init, first.state["params"]))
  # The jitted helpers return no frozen leaf: a jit output is a new buffer, and
  # the backbone must not be copied (per setting, or at all).
  _, frozen = freezing.split(first.state["params"], labels)

  def stack_own(states):
    fused_state = stack_states(states, labels)
    return dict(fused_state, params=freezing.split(fused_state["params"], labels)[0])

  def take_own(fused_state, index):
    own = unstack_state(fused_state, labels, index)
    return dict(own, params=freezing.split(own["params"], labels)[0])
  take = jax.jit(take_own, out_shardings=replicated)

  def unstack(fused_state, index):
    own = take(fused_state, index)
    shared = freezing.split(fused_state["params"], labels)[1]
    return dict(own, params=freezing.merge(own["params"], shared),
                opt_state=restructure(own["opt_state"], own_structures[index]))

  state = jax.jit(stack_own, out_shardings=replicated)(
      [dict(run.state, opt_state=restructure(run.state["opt_state"], group_structure))
       for run in runs])
  state["params"] = freezing.merge(state["params"], frozen)
  for run in runs:  # the stacked state is the only live one until the end
    run.state = None
  hparams = mesh_lib.put_replicated(hparams, mesh)
  fused_step = jax.jit(
      make_fused_train_step(first.model, labels, make_tx, **first.norm,
                            accumulation_steps=config.optim.accumulation_steps),
      donate_argnums=(0,),
      in_shardings=(replicated, replicated, mesh_lib.batch_sharded(mesh), replicated),
      out_shardings=(replicated, replicated))
  rng = first.dropout_rng()
  eval_every = first.eval_every
  eval_step = _fused_eval_step(first) if eval_every else None
  # The trainer's own batch iterator: the same data order as every separate run.
  batches = trainer.batches(first.data, config, start_step, features)
  diverged: dict[int, FloatingPointError] = {}
  pending = []
  began, began_step = time.perf_counter(), start_step
  with trainer.PreemptionNotice() as notice:
    for step in range(start_step + 1, first.total_steps + 1):
      state, metrics = fused_step(state, hparams, mesh_lib.global_batch(mesh, next(batches)),
                                  rng)
      pending.append(metrics)
      preempted = notice.received or first.manager.reached_preemption(step)
      save_due = (preempted or step == first.total_steps
                  or ckpt_lib.save_due(first.manager, step))
      log_due = step % config.log_every_steps == 0 or step == first.total_steps
      if log_due or save_due:
        window = jax.device_get(pending)
        pending = []
        losses = []
        for index, run in enumerate(runs):
          if index in diverged:
            continue
          own = [{k: v[index] for k, v in m.items()} for m in window]
          try:  # the trainer's own check: the same step and message as a separate run
            trainer.check_finite(own, step - len(own) + 1, run)
          except FloatingPointError as e:
            diverged[index] = e
            run.writer.print(f"{_setting_name(run.config)} diverged: {e}")
            continue
          if log_due:
            mean_metrics = {k: float(np.mean([m[k] for m in own])) for k in own[0]}
            run.writer.write(step, mean_metrics, prefix="train/")
            losses.append(f"{mean_metrics['loss']:.4f}")
        if log_due:
          rate = (step - began_step) / max(time.perf_counter() - began, 1e-9)
          first.writer.print(
              f"step {step}/{first.total_steps} | epoch {step / first.steps_per_epoch:.1f} | "
              f"loss {' '.join(losses) or '-'} | {len(runs) - len(diverged)}/{len(runs)} "
              f"settings | {rate * len(runs):.2f} setting-steps/s")
      if eval_every and step % eval_every == 0 and step < first.total_steps:
        # The settings share the first run's data pipeline as they share the data.
        vals = evaluate(first, eval_step, steps_lib.model_variables(state),
                        config.data.eval_split)
        for index, run in enumerate(runs):
          if index not in diverged:
            run.writer.write(step, vals[index], prefix="val/")
      if save_due:
        for index, run in enumerate(runs):
          if index not in diverged:
            ckpt_lib.save(run.manager, unstack(state, index), labels)
      if preempted:
        for run in runs:
          run.manager.wait_until_finished()
        first.writer.print(f"preempted: saved step {step} of {len(runs)} settings; rerun "
                           "the same command to resume")
        raise trainer.Preempted(step)
  for index, run in enumerate(runs):
    run.manager.wait_until_finished()
    run.state = unstack(state, index)
  return steps_lib.model_variables(state), diverged


def finish(runs: Sequence[trainer.Run], variables: dict,
           diverged: dict[int, FloatingPointError]) -> list[Outcome]:
  """``trainer.finish`` for every setting: val and test in one pass each, exports.

  Args:
    runs: the settings' runs after ``train`` (their ``state`` is final).
    variables: ``train``'s fused variables.
    diverged: ``train``'s diverged settings; they get their error back.

  Returns:
    Per setting the results dict ``trainer.finish`` would write to
    results.json, or its error.
  """
  first = runs[0]
  config = first.config
  splits = trainer.final_splits(config) if len(diverged) < len(runs) else []
  eval_step = _fused_eval_step(first) if splits else None
  scores = {name: evaluate(first, eval_step, variables, split) for name, split in splits}
  return [diverged[index] if index in diverged else trainer.write_results(
              run, {name: per_setting[index] for name, per_setting in scores.items()},
              log_prefix=f"{_setting_name(run.config)}: ")
          for index, run in enumerate(runs)]


def train_and_evaluate_settings(configs: Sequence[ml_collections.ConfigDict],
                                workdirs: Sequence[str]) -> list[Outcome]:
  """Trains and evaluates settings together; per setting what a separate run gives.

  Args:
    configs: run configs that differ only in ``FUSABLE_FIELDS``.
    workdirs: one folder per setting.

  Returns:
    Per setting, ``trainer.train_and_evaluate``'s results dict, or the
    ``FloatingPointError`` its separate run would raise.
  """
  runs = setup(configs, workdirs)
  try:
    by_step: dict[int, list[int]] = {}
    for index, run in enumerate(runs):
      by_step.setdefault(run.step, []).append(index)
    if len(by_step) > 1:
      runs[0].writer.print(f"settings resumed at different steps {sorted(by_step)}: one "
                           "program per step")
    outcomes: list[Outcome] = [None] * len(runs)
    frozen = None
    for _, indices in sorted(by_step.items()):
      group = [runs[i] for i in indices]
      if frozen is not None:
        # The previous program's steps donated the shared frozen arrays; its
        # final state holds them now.
        for run in group:
          trainable, _ = freezing.split(run.state["params"], run.labels)
          run.state["params"] = freezing.merge(trainable, frozen)
      variables, diverged = train(group)
      frozen = freezing.split(group[0].state["params"], group[0].labels)[1]
      for index, outcome in zip(indices, finish(group, variables, diverged)):
        outcomes[index] = outcome
    return outcomes
  finally:
    for run in runs:
      trainer.close(run)


def train_and_evaluate_grid(config: ml_collections.ConfigDict,
                            settings: Sequence[tuple[float, float]],
                            workdirs: Sequence[str]) -> list[Outcome]:
  """``train_and_evaluate_settings`` for (base lr, weight decay) pairs of one config."""
  configs = []
  for lr, weight_decay in settings:
    setting = copy.deepcopy(config)
    setting.optim.base_lr = float(lr)
    setting.optim.weight_decay = float(weight_decay)
    configs.append(setting)
  return train_and_evaluate_settings(configs, workdirs)
