"""Train, evaluate, checkpoint and export one run described by a config.

``train_and_evaluate(config, workdir)`` is the whole main job: build the data
and the model, load the backbone, freeze it, tune the trainable parameters on
a device mesh, evaluate with padded and masked batches, checkpoint with orbax
(a rerun of the same command resumes) and export the task. A separate run is
the one-run program of the shared loop (``loop``); ``sweeps`` trains several
settings in one program.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import ml_collections

from vpt_jax.training import config_checks
from vpt_jax.training import evaluation
from vpt_jax.training import loop
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.training import metric_writers
from vpt_jax.training import results
from vpt_jax.training import setup
from vpt_jax.training import steps as steps_lib


class _RunConsole(loop.Console):
  """A separate run's console: a progress line with throughput and ETA."""

  def __init__(self, run: setup.Run):
    self.run = run
    self.progress = None

  def start(self, start_step: int) -> None:
    run, config = self.run, self.run.config
    run.writer.print(f"{len(run.data.labels)} training images, {run.data.num_classes} classes, "
                     f"batch {config.optim.batch_size}, {run.total_steps} steps "
                     f"({config.optim.epochs} epochs) on {run.mesh.devices.size} device(s)"
                     + (f"; resuming at step {start_step}" if start_step else ""))

  def features(self, shape: tuple, seconds: float) -> None:
    self.run.writer.print(f"head-only: training on cached backbone features {shape}, "
                          f"computed in {seconds:.1f}s")

  def steps_begin(self, start_step: int) -> None:
    self.progress = metric_writers.Progress(self.run.total_steps, self.run.steps_per_epoch,
                                            self.run.config.optim.batch_size, start_step)

  def train_line(self, step: int, means: dict[int, dict]) -> None:
    self.run.writer.print(self.progress.line(step, means[0]))

  def validated(self, step: int, vals: list) -> None:
    val, = vals
    self.run.writer.print(f"step {step}: val top-1 {val['top1']:.4f} ({val['count']} images)")

  def preempted(self, step: int) -> None:
    # Every process reports (not only process 0): on multi-host runs the
    # logs show that all hosts stopped at the same step.
    print(f"preempted: saved step {step} in {self.run.workdir}/checkpoints (process "
          f"{jax.process_index()}); rerun the same command to resume", flush=True)


def _evaluate_fn(run: setup.Run, per_example: bool = False) -> Callable[[dict, str], list]:
  """(variables, split) -> [the run's scores on the split] (with "predictions":
  ``per_example``)."""
  eval_step = evaluation.jit_eval_step(
      run, steps_lib.make_eval_step(run.model, **run.norm, per_example=per_example))
  return lambda variables, split: [evaluation.evaluate(run, eval_step, variables, split)]


def _program(run: setup.Run) -> loop.Program:
  """The run's own jitted step: the program of one run."""
  train_step = mesh_lib.jit_train_step(
      steps_lib.make_train_step(run.model, run.labels, run.tx, run.schedule, **run.norm,
                                accumulation_steps=run.config.optim.accumulation_steps),
      run.mesh, state_shardings=mesh_lib.shardings_of(run.state))
  return loop.Program(state=run.state, step=train_step, evaluate=_evaluate_fn(run),
                      own_metrics=lambda metrics, index: metrics,
                      own_state=lambda state, index: state, raise_divergence=True)


def train(run: setup.Run, on_step: Optional[Callable[[int, dict], None]] = None) -> None:
  """Trains from the run's current step to the end, checkpointing as configured.

  ``on_step(step, state)``, if given, runs after every step (monitoring, e.g.
  benchmarks/soak.py); ``state`` is donated to the next step, so read it there.
  Raises the ``FloatingPointError`` of a non-finite loss, and
  ``preemption.Preempted`` after saving on a preemption notice.
  """
  loop.train([run], _RunConsole(run), lambda: _program(run), on_step=on_step)


def finish(run: setup.Run) -> dict:
  """Evaluates val and test, exports the task and writes results.json."""
  evaluate = _evaluate_fn(run, per_example=run.config.eval.save_predictions)
  variables = steps_lib.model_variables(run.state)
  outcome, = results.finish([run], lambda split: evaluate(variables, split))
  return outcome


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) one training run; returns what it writes to results.json.

  Returns:
    {"test": {"top1", "top5", "loss", "count"}, "trainable_params", ...}.
  """
  run = setup.setup_run(config, workdir)
  try:
    train(run)
    return finish(run)
  finally:
    setup.close(run)


def from_checkpoint(config: ml_collections.ConfigDict, workdir: str, action: str):
  """Evaluates ("evaluate") or exports ("export") the workdir's latest checkpoint.

  With ``head.init`` set (file or text) and no checkpoint yet, "evaluate"
  scores the initial state: the zero-shot accuracy of a text-initialised head.
  """
  run = setup.setup_run(config, workdir)
  try:
    zero_shot = action == "evaluate" and bool(config.head.init)
    if run.manager.latest_step() is None and not zero_shot:
      raise config_checks.ConfigError(
          f"{workdir} has no checkpoint to {action}; train first (--mode train) or point "
          "--workdir at a trained run")
    if action == "export":
      if config.export.merged:  # --config.export.merged=True: the merged backbone too
        results.export_merged(run)
      return results.export(run)
    return finish(run)
  finally:
    setup.close(run)
