"""The one training loop of separate runs and sweeps.

A ``Program`` is one compiled step that trains k runs at once: a separate run
(``trainer``) is k = 1, a sweep (``sweeps``) k settings vmapped over a leading
axis. Everything else is shared: the batches (a function of the seed and the
step, so every run draws those of an uninterrupted separate run), the dropout
rng, the finite-loss check, logging, validation, the checkpoint policy and
the preemption path. What differs between the two kinds is in the
``Program`` (how to step, score, and take one run's metrics and state out of
the program's) and in its ``Console`` (what the runs print).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from vpt_jax.checkpoints import train_state as ckpt_lib
from vpt_jax.methods import registry
from vpt_jax.training import config_checks
from vpt_jax.training import feature_cache
from vpt_jax.training import inputs
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.training import preemption
from vpt_jax.training import results
from vpt_jax.training import setup
from vpt_jax.training import steps as steps_lib


@dataclasses.dataclass
class Program:
  """One compiled training step of k runs, and how to read each run out of it.

  state: the program's initial state (donated to the first step).
  step: (state, batch, rng) -> (state, metrics), jitted.
  evaluate: (model variables of the program's state, split) -> per run
    {"top1", "top5", "loss", "count"}.
  own_metrics: (host metrics of one step, index) -> run ``index``'s metrics.
  own_state: (program state, index) -> run ``index``'s trainer state (what it
    checkpoints and ends with).
  raise_divergence: a non-finite loss or state stops everything (a separate run: the
    error propagates); otherwise only the run it concerns stops logging and
    checkpointing, and ``train`` returns its error.
  """
  state: dict
  step: Callable
  evaluate: Callable[[dict, str], list]
  own_metrics: Callable[[dict, int], dict]
  own_state: Callable[[dict, int], dict]
  raise_divergence: bool


class Console:
  """What a program's runs print while training; the defaults print nothing."""

  def start(self, start_step: int) -> None:
    """After the parameter overview: what is about to train."""

  def features(self, shape: tuple, seconds: float) -> None:
    """The cached backbone features (N, D) were computed in ``seconds``."""

  def steps_begin(self, start_step: int) -> None:
    """Right before the first step (throughput is measured from here)."""

  def train_line(self, step: int, means: dict[int, dict]) -> None:
    """A log step: {run index: mean train metrics of the window} of the live runs."""

  def validated(self, step: int, vals: list) -> None:
    """Validation scores per run during training (already written to metrics)."""

  def diverged(self, index: int, error: FloatingPointError) -> None:
    """Run ``index``'s loss or new state became non-finite; the others go on."""

  def preempted(self, step: int) -> None:
    """Every run saved ``step`` after a preemption notice; the process exits next."""


def check_finite(window: list, first_step: int, run: setup.Run) -> list:
  """Raises, naming the first bad step, if a fetched step's loss or new state is non-finite.

  ``window``: host metrics of the steps ``first_step``, ``first_step + 1``, ...;
  each holds the step's "loss" and ``steps.STATE_FINITE`` (its new trainable
  leaves and optimizer state). The loop checks before it saves, so every
  checkpoint is finite and the newest one is the one to name.
  """
  for offset, metrics in enumerate(window):
    problem = _non_finite(metrics)
    if problem:
      ckpt_lib.wait_until_saved(run.manager)  # a pending save of an earlier, finite step
      raise FloatingPointError(
          f"{problem} at step {first_step + offset}; stopping. "
          + _finite_checkpoint_advice(run, first_step + offset))
  return window


def _non_finite(metrics: dict) -> str:
  """What became non-finite in one step's host metrics, or "" if nothing did."""
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    return f"loss became {loss}"
  if not metrics[steps_lib.STATE_FINITE]:
    return (f"parameters or optimizer state became non-finite (the loss was still "
            f"{loss:.4g})")
  return ""


def _finite_checkpoint_advice(run: setup.Run, bad_step: int) -> str:
  """Which checkpoint survives a stop at ``bad_step``, and what to do next."""
  latest = run.manager.latest_step()
  if latest is None:
    return (f"No finite checkpoint exists (none was saved before step {bad_step}); start "
            "over in a new workdir with a smaller optim.base_lr.")
  return (f"The last finite checkpoint (step {latest}) is kept in {run.workdir}/checkpoints; "
          f"rerunning this command resumes from it. To get past step {bad_step}, lower "
          "optim.base_lr and rerun in a new workdir.")


def train(runs: Sequence[setup.Run], console: Console, build_program: Callable[[], Program],
          on_step: Optional[Callable[[int, dict], None]] = None
          ) -> tuple[dict, dict[int, FloatingPointError]]:
  """Trains ``runs`` (all at one step) to the end, checkpointing as configured.

  Args:
    runs: the runs of one program; ``runs[0]`` holds what they share (data,
      model, evaluation pipelines, the save and preemption schedule).
    console: what the runs print.
    build_program: returns the ``Program``; called once the cached features
      (if any) are computed from the runs' states.
    on_step: ``on_step(step, state)``, if given, runs after every step
      (monitoring, e.g. benchmarks/soak.py); ``state`` is donated to the next
      step, so read it there.

  Returns:
    (the program's final state, {position in ``runs``: the error} of the runs
    whose loss or state became non-finite); each run's ``state`` is set to its own
    final state.

  Raises:
    preemption.Preempted: after saving every run, on a preemption notice.
  """
  first = runs[0]
  start_step = first.step
  if any(run.step != start_step for run in runs):
    raise config_checks.ConfigError(f"fused runs must start at one step, got "
                                    f"{[run.step for run in runs]}")
  params = first.state["params"]
  first.writer.print(results.parameter_overview(params, first.labels, results.backbone_size(
      params, registry.get_method(first.config.method).fresh_patterns)))
  console.start(start_step)
  features = _cached_features(first, start_step, console)
  program = build_program()
  batches = inputs.batches(first.data, first.config, start_step, features)
  rng = first.dropout_rng()
  console.steps_begin(start_step)
  with preemption.PreemptionNotice() as notice:
    state, diverged = _steps(runs, program, console, batches, rng, start_step, notice,
                             on_step)
  for index, run in enumerate(runs):
    ckpt_lib.wait_until_saved(run.manager)
    run.state = program.own_state(state, index)
  return state, diverged


def _cached_features(run: setup.Run, start_step: int, console: Console):
  """The training split's backbone features (N, D) for a head-only run, else None."""
  if not (feature_cache.uses_cached_features(run.config, run.labels)
          and start_step < run.total_steps):
    return None
  began = time.perf_counter()
  features = feature_cache.compute_features(
      run.model, steps_lib.model_variables(run.state), run.data.images, run.mesh,
      batch_size=run.config.eval.batch_size, norm=run.norm)
  console.features(features.shape, time.perf_counter() - began)
  return features


class _Throughput:
  """Training images/s between the first and the last host sync (so after
  compilation), without the validation passes in between."""

  def __init__(self, batch_size: int):
    self.batch_size, self.first, self.last, self.excluded = batch_size, None, None, 0.0

  def synced(self, step: int) -> None:
    mark = (step, time.perf_counter())
    if self.first is None:
      self.first = mark
    else:
      self.last = mark

  def exclude(self, seconds: float) -> None:
    if self.first is not None:
      self.excluded += seconds

  def costs(self) -> dict:
    """{"train_images_per_s", "train_steps_timed"}, or {} with fewer than two syncs."""
    if self.last is None:
      return {}
    steps = self.last[0] - self.first[0]
    seconds = self.last[1] - self.first[1] - self.excluded
    return {"train_images_per_s": steps * self.batch_size / seconds,
            "train_steps_timed": steps}


def _steps(runs, program: Program, console: Console, batches, rng, start_step: int,
           notice: preemption.PreemptionNotice, on_step) -> tuple[dict, dict]:
  """The steps from ``start_step + 1`` to the end; see ``train``."""
  first = runs[0]
  config, manager, total_steps = first.config, first.manager, first.total_steps
  state, pending, diverged = program.state, [], {}
  throughput = _Throughput(config.optim.batch_size)
  # Crash-test hooks (ckpt_lib.TEST_HOOK_ENV); both None outside tests.
  kill_in_step, pause_after = ckpt_lib.hook_step("step"), ckpt_lib.hook_step("pause")
  for step in range(start_step + 1, total_steps + 1):
    state, metrics = program.step(state, mesh_lib.global_batch(first.mesh, next(batches)),
                                  rng)
    if step == kill_in_step:
      preemption.kill_inside_step([run.manager for run in runs])
    pending.append(metrics)  # device metrics, fetched only when needed (no per-step sync)
    preempted = notice.received or manager.reached_preemption(step)
    save_due = preempted or step == total_steps or ckpt_lib.save_due(manager, step)
    log_due = step % config.log_every_steps == 0 or step == total_steps
    if log_due or save_due:
      # Never checkpoint a non-finite state: orbax's max_to_keep would then
      # delete finite checkpoints to keep non-finite ones.
      _check_and_log(runs, program, console, jax.device_get(pending), step, log_due,
                     diverged)
      pending = []
      throughput.synced(step)
    if first.eval_every and step % first.eval_every == 0 and step < total_steps:
      began = time.perf_counter()
      # The runs share the first run's data pipeline as they share the data.
      vals = program.evaluate(steps_lib.model_variables(state), config.data.eval_split)
      for index, run in _live(runs, diverged):
        run.writer.write(step, vals[index], prefix="val/")
      console.validated(step, vals)
      throughput.exclude(time.perf_counter() - began)
    if save_due:
      for index, run in _live(runs, diverged):
        ckpt_lib.save(run.manager, program.own_state(state, index), run.labels)
    if preempted:
      for run in runs:
        ckpt_lib.wait_until_saved(run.manager)
      console.preempted(step)
      raise preemption.Preempted(step)
    if step == pause_after:
      preemption.pause_for_test(first.workdir, step)
    if on_step is not None:
      on_step(step, state)
  for run in runs:
    run.costs.update(throughput.costs(), fused_settings=len(runs))
  return state, diverged


def _live(runs, diverged: dict):
  """(index, run) of the runs whose loss stayed finite."""
  return [(index, run) for index, run in enumerate(runs) if index not in diverged]


def _check_and_log(runs, program: Program, console: Console, window: list, step: int,
                   log_due: bool, diverged: dict) -> None:
  """Checks each live run's window of host metrics; on a log step writes their means.

  A run whose window holds a non-finite loss or state joins ``diverged`` (or, with
  ``program.raise_divergence``, the error propagates).
  """
  means = {}
  for index, run in _live(runs, diverged):
    own = [program.own_metrics(metrics, index) for metrics in window]
    try:  # the same step and message for a run of any program
      check_finite(own, step - len(own) + 1, run)
    except FloatingPointError as e:
      if program.raise_divergence:
        raise
      diverged[index] = e
      console.diverged(index, e)
      continue
    if log_due:
      means[index] = {k: float(np.mean([m[k] for m in own])) for k in own[0]
                      if k != steps_lib.STATE_FINITE}  # 1 by now: nothing to log
      run.writer.write(step, means[index], prefix="train/")
  if log_due:
    console.train_line(step, means)
