"""Scoring a run on a split: every example exactly once, in padded and masked batches.

One pass over a split serves any number of settings: an eval step whose sums
carry a leading settings axis (a sweep's vmapped step) is summarised per
setting by ``evaluate_each``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vpt_jax.data import eval_stream
from vpt_jax.training import config_checks
from vpt_jax.training import inputs
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.training import predictions
from vpt_jax.training import setup
from vpt_jax.training import steps as steps_lib


def jit_eval_step(run: setup.Run, eval_step: Callable) -> Callable:
  """``eval_step(variables, batch) -> sums`` compiled for the run's mesh.

  The variables and the sums are replicated, the batch split over the devices.
  """
  replicated = mesh_lib.replicated(run.mesh)
  return jax.jit(eval_step, in_shardings=(replicated, mesh_lib.batch_sharded(run.mesh)),
                 out_shardings=replicated)


def eval_totals(run: setup.Run, eval_step, variables, split: str) -> dict:
  """The sums of ``eval_step`` over every example of ``split``, on the host.

  Reads the run's one pipeline for the split (``Run.eval_input``).
  """
  config = run.config
  mesh_lib.check_batch_divisible(config.eval.batch_size, run.mesh)
  eval_source, dataset = run.eval_input(split)
  totals, rows = None, []
  for batch in eval_stream.eval_batches(eval_source, **inputs.eval_stream_options(config),
                                     dataset=dataset):
    sums = eval_step(variables, mesh_lib.global_batch(run.mesh, batch))
    if "per_example" in sums:  # kept per row, not summed
      rows.append(jax.device_get(sums.pop("per_example")))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise config_checks.ConfigError(
        f"split {eval_source.split!r} of {eval_source.builder} is empty")
  totals = jax.device_get(totals)
  if rows:
    totals["per_example"] = predictions.keep_real_rows(rows)
  return totals


def evaluate(run: setup.Run, eval_step, variables, split: str) -> dict:
  """Top-1/top-5/loss over every example of ``split`` exactly once.

  ``variables``: ``steps_lib.model_variables(state)``. A per-example
  ``eval_step`` adds "predictions": {"logits" (N, C), "labels" (N,)}.
  """
  totals = eval_totals(run, eval_step, variables, split)
  per_example = totals.pop("per_example", None)
  score = steps_lib.summarize_eval(totals)
  if per_example is not None:
    score["predictions"] = per_example
  return score


def evaluate_each(run: setup.Run, eval_step, variables, split: str) -> list[dict]:
  """``evaluate`` for S settings in one pass over the split.

  Args:
    eval_step: returns ``steps.make_eval_step``'s sums with shape (S,) each.
    variables: the settings' variables, as ``eval_step`` takes them.

  Returns:
    Per setting {"top1", "top5", "loss", "count"}.
  """
  totals = eval_totals(run, eval_step, variables, split)
  per_example = totals.pop("per_example", None)
  scores = [steps_lib.summarize_eval({k: v[index] for k, v in totals.items()})
            for index in range(len(totals["count"]))]
  if per_example is not None:
    for index, score in enumerate(scores):
      score["predictions"] = {k: v[index] for k, v in per_example.items()}
  return scores


def final_splits(config) -> list[tuple[str, str]]:
  """[("val", split), ("test", split)] of the splits a finished run is scored on."""
  return [(name, split) for name, split in (("val", config.data.eval_split),
                                            ("test", config.data.test_split)) if split]
