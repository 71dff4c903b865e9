"""What a task's final runs left on disk: their records and saved predictions.

A summary.json (``selection.summarize``) lists the final seeds; their folders
are ``<summary folder>/final/seed<seed>/`` (``run_plan.RunSpec.folder``),
each with run.json and, with ``eval.save_predictions``, predictions_test.npz.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from vpt_jax.protocol import bootstrap
from vpt_jax.protocol import run_records
from vpt_jax.training import predictions


def run_dir(summary: dict, seed: int) -> str:
  """The folder of one final run of a summary (with the "folder" ``report.collect``
  adds: ``<workdir>/<task folder>/<name>``, as ``run_plan.RunSpec.folder`` lays out)."""
  return os.path.join(summary["folder"], "final", f"seed{seed}")


def finished_seeds(summary: dict) -> list[int]:
  return [f["seed"] for f in summary.get("finals", []) if f["status"] == "finished"]


def record(summary: dict, seed: int) -> Optional[dict]:
  """The run.json of a final run, or None."""
  return run_records.read_json(os.path.join(run_dir(summary, seed), run_records.RUN_FILE))


def records(summaries: list[dict]) -> dict[int, dict[int, Optional[dict]]]:
  """{id(summary): {seed: ``record``} over its finished seeds}: each run.json read once,
  for the report's data checks and cost tables."""
  return {id(s): {seed: record(s, seed) for seed in finished_seeds(s)} for s in summaries}


def test_predictions(summary: dict) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(correct bool (seeds, N), labels int32 (N,)) over the finished final seeds.

  None unless every finished seed saved its test predictions on the same
  labels (``eval.save_predictions``), so the seeds can be stacked.
  """
  seeds = finished_seeds(summary)
  rows, labels = [], None
  for seed in seeds:
    path = os.path.join(run_dir(summary, seed), predictions.FILE_PATTERN.format(split="test"))
    if not os.path.exists(path):
      return None
    logits, seed_labels = predictions.read(path)
    if labels is not None and not np.array_equal(labels, seed_labels):
      return None
    labels = seed_labels
    rows.append(bootstrap.correct(logits, seed_labels))
  if not rows:
    return None
  return np.stack(rows), labels
