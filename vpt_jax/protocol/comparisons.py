"""The report's method-versus-method differences per task, and per-class accuracies.

For each task and each pair of methods (A before B in the report's method
order): delta = A's mean test top-1 over seeds - B's, the seed standard
deviation of the difference and the paired bootstrap interval over the test
examples (``bootstrap``; needs both methods' final runs to have saved their
predictions, ``eval.save_predictions``), and whether the difference is inside
the noise. The per-class table gives each method's test accuracy per class
(mean over seeds), from the same saved predictions.
"""

from __future__ import annotations

import itertools
from typing import Optional

import numpy as np

from vpt_jax.protocol import bootstrap
from vpt_jax.protocol import final_runs


def _pct(value: Optional[float], sign: bool = False) -> str:
  if value is None:
    return "–"
  return f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"


def test_predictions(summaries: list[dict]) -> dict:
  """{id(summary): ``final_runs.test_predictions(summary)``}: every summary's saved
  predictions, read once for both the differences and the per-class tables."""
  return {id(s): final_runs.test_predictions(s) for s in summaries}


def compare(a: dict, b: dict, correct: dict) -> dict:
  """One pair's row: {"diff", "sd", "interval" (or None), "noise", "note"}.

  ``a``, ``b``: the methods' summaries; ``correct``: summary id -> the output
  of ``final_runs.test_predictions`` (or None).
  """
  diff = a["test_top1_mean"] - b["test_top1_mean"]
  sd = bootstrap.seed_sd(a["test_top1_std"] if a["num_seeds"] > 1 else None,
                         b["test_top1_std"] if b["num_seeds"] > 1 else None)
  ours, theirs = correct.get(id(a)), correct.get(id(b))
  interval, note = None, ""
  if ours is None or theirs is None:
    note = "no saved predictions (eval.save_predictions)"
  elif not np.array_equal(ours[1], theirs[1]):
    note = "test labels differ: not paired"
  else:
    interval = bootstrap.paired_bootstrap(ours[0], theirs[0])
  return {"diff": diff, "sd": sd, "interval": interval,
          "noise": bootstrap.inside_noise(diff, interval, sd), "note": note}


def rows(summaries: list[dict], methods: list[str],
         correct: Optional[dict] = None) -> list[dict]:
  """Per task (sorted) and method pair: {"task", "a", "b", **compare(...)}.

  ``correct``: ``test_predictions(summaries)`` if already read (default: read here).
  """
  done = [s for s in summaries if s["test_top1_mean"] is not None]
  correct = test_predictions(done) if correct is None else correct
  by_task: dict[str, dict[str, dict]] = {}
  for summary in done:
    by_task.setdefault(summary["task"], {})[summary["method"]] = summary
  out = []
  for task in sorted(by_task):
    present = [m for m in methods if m in by_task[task]]
    for a, b in itertools.combinations(present, 2):
      out.append({"task": task, "a": a, "b": b,
                  **compare(by_task[task][a], by_task[task][b], correct)})
  return out


def markdown(summaries: list[dict], methods: list[str], correct: Optional[dict] = None) -> str:
  """The differences table, or "" when no task has two methods (``correct``: as ``rows``)."""
  found = rows(summaries, methods, correct)
  if not found:
    return ""
  level = int(100 * bootstrap.LEVEL)
  lines = [f"Δ = A − B in test top-1 points (means over seeds); seed sd = sqrt(sd_A² + "
           f"sd_B²); {level}% paired bootstrap interval over the test examples "
           f"({bootstrap.RESAMPLES} resamples, seed {bootstrap.SEED}; "
           "vpt_jax/protocol/bootstrap.py). *inside the noise*: the interval holds 0 or "
           "|Δ| <= seed sd.", "",
           "| task | A | B | Δ | seed sd | bootstrap interval | verdict |",
           "|---|---|---|---|---|---|---|"]
  for row in found:
    interval = row["interval"]
    span = (f"[{_pct(interval['low'], True)}, {_pct(interval['high'], True)}]"
            if interval else row["note"])
    if row["noise"]:
      verdict = "*inside the noise*"
    elif interval is None and row["sd"] is None:
      verdict = "unknown (one seed, no predictions)"
    else:
      verdict = f"{row['a'] if row['diff'] > 0 else row['b']} better"
    lines.append(f"| {row['task']} | {row['a']} | {row['b']} | {_pct(row['diff'], True)} | "
                 f"{_pct(row['sd'])} | {span} | {verdict} |")
  return "\n".join(lines)


def per_class(summaries: list[dict], methods: list[str], correct: Optional[dict] = None) -> str:
  """Per task, a class x method table of test accuracy (%, mean over seeds).

  ``correct``: ``test_predictions(summaries)`` if already read (default: read here).
  """
  read = test_predictions(summaries) if correct is None else correct
  sections = []
  tasks = sorted({s["task"] for s in summaries})
  for task in tasks:
    columns = {}
    for summary in summaries:
      if summary["task"] != task:
        continue
      found = read.get(id(summary))
      if found is not None:
        correct, labels = found
        classes = np.arange(labels.max() + 1)
        columns[summary["method"]] = [
            (100 * correct[:, labels == k].mean() if (labels == k).any() else None,
             int((labels == k).sum())) for k in classes]
    if not columns:
      continue
    ordered = [m for m in methods if m in columns]
    count = max(len(c) for c in columns.values())
    lines = [f"## {task}", "", "| class | examples | " + " | ".join(ordered) + " |",
             "|---|---|" + "---|" * len(ordered)]
    for k in range(count):
      sizes = [columns[m][k][1] for m in ordered if k < len(columns[m])]
      cells = [("–" if k >= len(columns[m]) or columns[m][k][0] is None
                else f"{columns[m][k][0]:.1f}") for m in ordered]
      lines.append(f"| {k} | {sizes[0] if sizes else 0} | " + " | ".join(cells) + " |")
    sections.append("\n".join(lines))
  return "\n\n".join(sections)
