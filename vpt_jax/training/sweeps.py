"""Sweeps: several learning-rate x weight-decay settings of one run in one compiled program.

The tuning protocol (``protocol/tuning.py``) trains up to 40 settings of the
same task on the same frozen backbone; they differ only in
``optim.base_lr`` and ``optim.weight_decay``. Here S of them train together,
as one program of the shared loop (``loop``) whose step is the vmapped step
of ``sweep_steps``.

Every setting sees what its separate run sees: the same batches (the data
order is a function of the seed and the step), the same dropout masks (the
rng is fold_in(key(seed + 1), step)), the same initial parameters and the same
optimizer arithmetic. It ends with the parameters of
``trainer.train_and_evaluate`` on its own config up to float rounding: vmap
turns the per-setting matmuls into batched ones whose summation order the
compiler may choose differently (tests/test_sweeps.py: within 1e-5).

Each setting keeps its own folder, laid out like a separate run's
(config.json, metrics.jsonl, checkpoints/ in a separate run's layout,
results.json, export/), so the protocol's records, the report and a resume,
fused or not, read it as usual. The data, the model and the backbone are
loaded once; evaluation scores every setting in one pass over each split. A
setting whose loss or state becomes non-finite stops being logged and
checkpointed at the step a separate run would stop (its checkpoints, all
finite, stay), and is returned as the
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
from typing import Sequence

import jax
import ml_collections

from vpt_jax.params import freezing
from vpt_jax.training import config_checks
from vpt_jax.training import evaluation
from vpt_jax.training import loop
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.training import results
from vpt_jax.training import setup
from vpt_jax.training import steps as steps_lib
from vpt_jax.training import sweep_steps

# The only config fields in which fused settings may differ.
FUSABLE_FIELDS = ("optim.base_lr", "optim.weight_decay")


def structure_key(config) -> tuple:
  """What must agree between fused settings besides their configs' other fields.

  The reference's AdamW ("adamw") falls back to plain SGD when weight_decay is
  0, so those settings need a different program from the non-zero ones.
  """
  if sweep_steps.optimizer_name(config) == "adamw":
    return ("adamw", config.optim.weight_decay != 0)
  return (sweep_steps.optimizer_name(config),)


def check_fusable(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """Raises ``config_checks.ConfigError`` unless the configs can train in one program.

  They must differ in nothing but ``FUSABLE_FIELDS`` and share one
  ``structure_key``.
  """
  if not configs:
    raise config_checks.ConfigError("no settings to fuse; pass at least one config")
  flats = [config_checks.config_fields(c) for c in configs]
  keys = sorted(set().union(*flats))
  differing = [k for k in keys if k not in FUSABLE_FIELDS
               and any(f.get(k) != flats[0].get(k) for f in flats[1:])]
  if differing:
    details = "; ".join(
        f"{k}: {', '.join(repr(f.get(k)) for f in flats)}" for k in differing[:5])
    raise config_checks.ConfigError(
        f"settings trained in one program may differ only in {', '.join(FUSABLE_FIELDS)}, "
        f"but these fields differ too: {details}"
        + (" ..." if len(differing) > 5 else "")
        + ". Train them in separate groups (or one by one).")
  structures = {structure_key(c) for c in configs}
  if len(structures) > 1:
    raise config_checks.ConfigError(
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



# ----------------------------------------------------------------- running settings

def setup_settings(configs: Sequence[ml_collections.ConfigDict],
                   workdirs: Sequence[str]) -> list[setup.Run]:
  """One ``setup.Run`` per setting, sharing data, model and frozen parameters.

  ``setup.setup_run``'s checks for each config (config.json included), then
  ``setup.build_runs``: the data is decoded, the model built and the backbone
  loaded once; every run's state holds the same frozen arrays.
  """
  check_fusable(configs)
  if len(set(workdirs)) != len(workdirs) or len(workdirs) != len(configs):
    raise config_checks.ConfigError(
        f"need one distinct workdir per setting, got {list(workdirs)}")
  for config in configs:
    config_checks.validate_config(config)
  config_checks.check_data(configs[0])  # fused settings share their data (check_fusable)
  for workdir in workdirs:
    config_checks.prepare_workdir(workdir)
  return setup.build_locked_runs(configs, workdirs)


def _setting_name(config) -> str:
  return f"lr {config.optim.base_lr:g} wd {config.optim.weight_decay:g}"


class _SweepConsole(loop.Console):
  """A sweep's console: one line per log step on the first setting's console,
  with every live setting's loss."""

  def __init__(self, runs: Sequence[setup.Run]):
    self.runs = runs
    self.began, self.began_step = None, 0

  def start(self, start_step: int) -> None:
    first, runs = self.runs[0], self.runs
    first.writer.print(
        f"{len(runs)} settings in one program ({', '.join(_setting_name(r.config) for r in runs)}"
        f"): {len(first.data.labels)} training images, batch {first.config.optim.batch_size}, "
        f"{first.total_steps} steps on {first.mesh.devices.size} device(s)"
        + (f"; resuming at step {start_step}" if start_step else ""))

  def steps_begin(self, start_step: int) -> None:
    self.began, self.began_step = time.perf_counter(), start_step

  def train_line(self, step: int, means: dict[int, dict]) -> None:
    first, settings = self.runs[0], len(self.runs)
    losses = [f"{m['loss']:.4f}" for m in means.values()]
    rate = (step - self.began_step) / max(time.perf_counter() - self.began, 1e-9)
    first.writer.print(
        f"step {step}/{first.total_steps} | epoch {step / first.steps_per_epoch:.1f} | "
        f"loss {' '.join(losses) or '-'} | {len(means)}/{settings} "
        f"settings | {rate * settings:.2f} setting-steps/s")

  def diverged(self, index: int, error: FloatingPointError) -> None:
    run = self.runs[index]
    run.writer.print(f"{_setting_name(run.config)} diverged: {error}")

  def preempted(self, step: int) -> None:
    self.runs[0].writer.print(f"preempted: saved step {step} of {len(self.runs)} settings; "
                              "rerun the same command to resume")


def _evaluate_fn(first: setup.Run, per_example: bool = False):
  """(fused variables, split) -> per setting scores, in one pass over the split
  (with "predictions": ``per_example``)."""
  eval_step = evaluation.jit_eval_step(
      first, sweep_steps.make_fused_eval_step(first.model, first.labels, **first.norm,
                                              per_example=per_example))
  # The settings share the first run's data pipeline as they share the data.
  return lambda variables, split: evaluation.evaluate_each(first, eval_step, variables, split)


def _program(runs: Sequence[setup.Run]) -> loop.Program:
  """The settings' vmapped step and their stacked state (the only live one until the end)."""
  first = runs[0]
  config, labels = first.config, first.labels
  hparams = sweep_steps.setting_hparams([run.config for run in runs])
  make_tx = sweep_steps.make_setting_optimizer(
      config, labels, first.steps_per_epoch,
      decay=any(run.config.optim.weight_decay != 0 for run in runs))
  group_tx, _ = make_tx(hparams["peak_lr"][0], hparams["weight_decay"][0])
  state = _stack(runs, jax.tree.structure(jax.eval_shape(group_tx.init,
                                                         first.state["params"])))
  own_state = _unstacker(runs)
  for run in runs:
    run.state = None
  hparams = mesh_lib.put_replicated(hparams, first.mesh)
  fused_step = mesh_lib.jit_train_step(
      sweep_steps.make_fused_train_step(first.model, labels, make_tx, **first.norm,
                                        accumulation_steps=config.optim.accumulation_steps),
      first.mesh, state_shardings=mesh_lib.shardings_of(state), replicated_inputs=1)
  return loop.Program(
      state=state, step=lambda state, batch, rng: fused_step(state, hparams, batch, rng),
      evaluate=_evaluate_fn(first),
      own_metrics=lambda metrics, index: {k: v[index] for k, v in metrics.items()},
      own_state=own_state, raise_divergence=False)


def _stack(runs: Sequence[setup.Run], group_structure) -> dict:
  """The runs' states stacked into one fused state, optimizer states in ``group_structure``.

  The jitted stacking returns no frozen leaf: a jit output is a new buffer, and
  the backbone must not be copied (per setting, or at all).
  """
  labels = runs[0].labels
  _, frozen = freezing.split(runs[0].state["params"], labels)

  def stack_own(states):
    fused_state = sweep_steps.stack_states(states, labels)
    return dict(fused_state, params=freezing.split(fused_state["params"], labels)[0])
  states = [dict(run.state, opt_state=sweep_steps.restructure(run.state["opt_state"],
                                                              group_structure))
            for run in runs]
  shardings = mesh_lib.train_state_shardings(
      jax.eval_shape(stack_own, states), runs[0].mesh,
      shard_optimizer=runs[0].config.optim.shard_state)
  state = jax.jit(stack_own, out_shardings=shardings)(states)
  state["params"] = freezing.merge(state["params"], frozen)
  return state


def _unstacker(runs: Sequence[setup.Run]):
  """Returns unstack(fused state, index) -> setting ``index``'s trainer state.

  Checkpoints keep each setting's own optimizer-state structure (a separate
  run can resume them); the program uses the group's. Read before the runs'
  states are dropped.
  """
  labels = runs[0].labels
  own_structures = [jax.tree.structure(run.state["opt_state"]) for run in runs]

  def take_own(fused_state, index):
    own = sweep_steps.unstack_state(fused_state, labels, index)
    return dict(own, params=freezing.split(own["params"], labels)[0])
  take = jax.jit(take_own, out_shardings=mesh_lib.replicated(runs[0].mesh))

  def unstack(fused_state, index):
    own = take(fused_state, index)
    shared = freezing.split(fused_state["params"], labels)[1]
    return dict(own, params=freezing.merge(own["params"], shared),
                opt_state=sweep_steps.restructure(own["opt_state"], own_structures[index]))
  return unstack


def train(runs: Sequence[setup.Run]) -> tuple[dict, dict[int, FloatingPointError]]:
  """Trains ``runs`` (one per setting, all at the same step) to the end together.

  Logs, evaluates (``eval.every_epochs``) and checkpoints each setting in its
  own folder as ``trainer.train`` would, and sets each run's ``state`` to its
  final state.

  Returns:
    (variables, diverged): ``steps.model_variables`` of the final fused state
    (for ``finish``), and {position in ``runs``: the error} for the settings
    whose loss or state became non-finite (their checkpoints stop at the last
    finite step saved, as a separate run's do).

  Raises:
    preemption.Preempted: after saving every setting, on a preemption notice.
  """
  state, diverged = loop.train(runs, _SweepConsole(runs), lambda: _program(runs))
  return steps_lib.model_variables(state), diverged


def finish(runs: Sequence[setup.Run], variables: dict,
           diverged: dict[int, FloatingPointError]) -> list[results.Outcome]:
  """``trainer.finish`` for every setting: val and test in one pass each, exports.

  Args:
    runs: the settings' runs after ``train`` (their ``state`` is final).
    variables: ``train``'s fused variables.
    diverged: ``train``'s diverged settings; they get their error back.

  Returns:
    Per setting the results dict ``trainer.finish`` would write to
    results.json, or its error.
  """
  evaluate = _evaluate_fn(runs[0], per_example=runs[0].config.eval.save_predictions)
  return results.finish(runs, lambda split: evaluate(variables, split), diverged,
                        log_prefix=lambda run: f"{_setting_name(run.config)}: ")


def train_and_evaluate_settings(configs: Sequence[ml_collections.ConfigDict],
                                workdirs: Sequence[str]) -> list[results.Outcome]:
  """Trains and evaluates settings together; per setting what a separate run gives.

  Args:
    configs: run configs that differ only in ``FUSABLE_FIELDS``.
    workdirs: one folder per setting.

  Returns:
    Per setting, ``trainer.train_and_evaluate``'s results dict, or the
    ``FloatingPointError`` its separate run would raise.
  """
  runs = setup_settings(configs, workdirs)
  try:
    by_step: dict[int, list[int]] = {}
    for index, run in enumerate(runs):
      by_step.setdefault(run.step, []).append(index)
    if len(by_step) > 1:
      runs[0].writer.print(f"settings resumed at different steps {sorted(by_step)}: one "
                           "program per step")
    outcomes: list[results.Outcome] = [None] * len(runs)
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
      setup.close(run)


def train_and_evaluate_grid(config: ml_collections.ConfigDict,
                            settings: Sequence[tuple[float, float]],
                            workdirs: Sequence[str]) -> list[results.Outcome]:
  """``train_and_evaluate_settings`` for (base lr, weight decay) pairs of one config."""
  configs = []
  for lr, weight_decay in settings:
    setting = copy.deepcopy(config)
    setting.optim.base_lr = float(lr)
    setting.optim.weight_decay = float(weight_decay)
    configs.append(setting)
  return train_and_evaluate_settings(configs, workdirs)
