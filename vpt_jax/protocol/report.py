r"""Turns protocol results folders into tables and plots.

  python -m vpt_jax.protocol.report RESULTS_DIR [RESULTS_DIR ...] [--out DIR]

Reads every ``summary.json`` below the folders (one per task and method,
written by ``tuning.run_protocol``) and writes to ``--out`` (default
``RESULTS_DIR/report``):

* ``report.md``: per benchmark a task x method table of test top-1 (%, mean +-
  std over seeds at the last epoch) with the VPT paper's number beside ours and
  the difference, the group means (Natural, Specialized, Structured) and both
  averages papers use: the mean of the 19 tasks and the mean of the three
  group means (they differ by 2-2.5 points; cvpt.md 5).
* ``results.csv``: the same numbers, one row per task and method.
* ``bars.png`` (per-task bars per method, paper numbers as markers) and
  ``curves_<method>.png`` (training loss of the final runs, from metrics.jsonl).
* per benchmark a cost table (``cost_table``: parameters, export bytes,
  throughputs, memory, FLOPs, mergeable, device, V-PETL's PPT), the plot
  ``params_vs_accuracy_<benchmark>.png`` and ``costs.csv``;
* in report.md also: the data each result read (``data_checks``: fingerprints
  against the canonical ones and each other; a result whose data differs is
  marked "data differs" in the tables) and the method-versus-method
  differences with their seed spread and paired bootstrap interval
  (``comparisons``); ``per_class.md``: per-class test accuracy from the
  saved predictions (``eval.save_predictions``);
* the few-shot and domain-generalisation sections (``few_shot_report``).

The paper's numbers are recalled from the paper, not verified against the PDF
(vpt_jax/protocol/hparams.py says so for each); the report repeats the warning.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from typing import Optional

import numpy as np

from vpt_jax.data import fgvc
from vpt_jax.data import vtab_tasks
from vpt_jax.protocol import comparisons
from vpt_jax.protocol import cost_table
from vpt_jax.protocol import data_checks
from vpt_jax.protocol import few_shot_report
from vpt_jax.protocol import final_runs
from vpt_jax.protocol import hparams
from vpt_jax.protocol import run_records

SUMMARY_FILE = "summary.json"
METHOD_ORDER = ("vpt_deep", "vpt_shallow", "linear", "full")


def collect(results_dirs: list[str]) -> list[dict]:
  """Every summary.json below the folders, with the folder it came from."""
  return [{**summary, "folder": root}
          for root, summary in run_records.json_files_below(results_dirs, SUMMARY_FILE)]


def _methods(summaries: list[dict]) -> list[str]:
  names = {s["method"] for s in summaries}
  known = [m for m in METHOD_ORDER if m in names]
  return known + sorted(names - set(known))


def _benchmark_tasks(kind: str, summaries: list[dict]) -> list[tuple[str, str, str]]:
  """[(task key, title, group)] of a benchmark in paper order (all of them for
  VTAB and FGVC, so missing tasks show), or the tasks present for "custom"."""
  if kind == "vtab":
    return [(f"vtab/{t.name}", t.title, t.group) for t in vtab_tasks.TASKS.values()]
  if kind == "fgvc":
    return [(f"fgvc/{d.name}", d.title, "fgvc") for d in fgvc.DATASETS.values()]
  tasks = sorted({s["task"] for s in summaries
                  if not s["task"].startswith(("vtab/", "fgvc/"))})
  return [(t, t, "custom") for t in tasks]


def _paper(method: str, task: str) -> Optional[float]:
  """The paper's number for a method (our method name) on a task, or None."""
  return hparams.PAPER_RESULTS.get(method, {}).get(task)


def table_rows(kind: str, summaries: list[dict],
               data: Optional[dict] = None) -> tuple[list[str], list[dict]]:
  """(methods, rows) of one benchmark; a row holds per method ours/paper/diff (%).

  ``data``: ``data_checks.statuses``; a cell whose data differs says so.
  """
  data = data or {}
  present = [s for s in summaries if _kind(s["task"]) == kind]
  methods = _methods(present)
  by_key = {(s["task"], s["method"]): s for s in present}
  base = {s["method"]: s.get("base_method", s["method"]) for s in present}
  rows = []
  for task, title, group in _benchmark_tasks(kind, present):
    row = {"task": task, "title": title, "group": group, "cells": {}}
    for method in methods:
      summary = by_key.get((task, method))
      mean = summary and summary["test_top1_mean"]
      cell = {"mean": None if mean is None else 100 * mean,
              "std": None if not summary or summary["test_top1_std"] is None
              else 100 * summary["test_top1_std"],
              "seeds": summary["num_seeds"] if summary else 0,
              "planned": len(summary["finals"]) if summary else 0,
              "paper": _paper(base.get(method, method), task),
              "best": summary.get("best") if summary else None,
              "data": data.get((task, method), {}).get("state")}
      cell["diff"] = (None if cell["mean"] is None or cell["paper"] is None
                      else cell["mean"] - cell["paper"])
      row["cells"][method] = cell
    rows.append(row)
  return methods, rows


def _kind(task: str) -> str:
  return task.split("/")[0] if task.startswith(("vtab/", "fgvc/")) else "custom"


def _mean_row(label: str, rows: list[dict], methods: list[str], total: int) -> dict:
  """Means over the rows that have a number; paper means over the same rows."""
  cells = {}
  for method in methods:
    have = [r["cells"][method] for r in rows if r["cells"][method]["mean"] is not None]
    ours = float(np.mean([c["mean"] for c in have])) if have else None
    papers = [c["paper"] for c in have if c["paper"] is not None]
    paper = float(np.mean(papers)) if have and len(papers) == len(have) else None
    cells[method] = {"mean": ours, "std": None, "count": len(have), "total": total,
                     "paper": paper, "diff": None if ours is None or paper is None
                     else ours - paper}
  return {"title": label, "cells": cells}


def summary_rows(kind: str, methods: list[str], rows: list[dict]) -> list[dict]:
  """Group means, the mean over all tasks and (VTAB) the mean of group means."""
  if kind != "vtab":
    return [_mean_row("Mean", rows, methods, len(rows))]
  groups = [_mean_row(f"{g.capitalize()} mean", [r for r in rows if r["group"] == g],
                      methods, sum(r["group"] == g for r in rows)) for g in vtab_tasks.GROUPS]
  out = groups + [_mean_row(f"Mean of {len(rows)} tasks", rows, methods, len(rows))]
  of_groups = {}
  for method in methods:
    group_cells = [g["cells"][method] for g in groups]
    complete = all(c["mean"] is not None for c in group_cells)
    ours = float(np.mean([c["mean"] for c in group_cells])) if complete else None
    papers = [c["paper"] for c in group_cells]
    paper = float(np.mean(papers)) if complete and None not in papers else None
    of_groups[method] = {
        "mean": ours, "std": None, "paper": paper,
        "count": sum(c["count"] for c in group_cells), "total": len(rows),
        "diff": None if ours is None or paper is None else ours - paper}
  out.append({"title": "Mean of the 3 group means", "cells": of_groups})
  return out


def _fmt(value: Optional[float], digits: int = 1, sign: bool = False) -> str:
  if value is None:
    return "–"
  return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _ours(cell: dict) -> str:
  if cell["mean"] is None:
    return "–"
  text = _fmt(cell["mean"])
  if cell.get("std") is not None:
    text += f" ± {cell['std']:.1f}"
  if "planned" in cell and cell["seeds"] < cell["planned"]:
    text += f" ({cell['seeds']}/{cell['planned']} seeds)"
  if "count" in cell and cell["count"] < cell["total"]:
    text += f" ({cell['count']}/{cell['total']} tasks)"
  if cell.get("data") == "differs":
    text += " (data differs)"
  return text


def markdown_table(kind: str, summaries: list[dict], data: Optional[dict] = None) -> str:
  methods, rows = table_rows(kind, summaries, data)
  header = ["task"] + (["group"] if kind == "vtab" else [])
  for method in methods:
    header += [method, "paper", "Δ"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows + summary_rows(kind, methods, rows):
    is_summary = "task" not in row
    cells = [f"**{row['title']}**" if is_summary else row["title"]]
    if kind == "vtab":
      cells.append("" if is_summary else row["group"])
    for method in methods:
      cell = row["cells"][method]
      cells += [_ours(cell), _fmt(cell["paper"]), _fmt(cell["diff"], sign=True)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_csv(path: str, summaries: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["benchmark", "task", "group", "method", "test_top1_mean",
                     "test_top1_std", "seeds", "best_lr", "best_weight_decay",
                     "best_val_top1", "paper_top1", "diff_vs_paper"])
    for kind in ("vtab", "fgvc", "custom"):
      methods, rows = table_rows(kind, summaries)
      for row in rows + summary_rows(kind, methods, rows):
        for method in methods:
          cell = row["cells"][method]
          if cell["mean"] is None:
            continue
          best = cell.get("best") or {}
          writer.writerow([kind, row.get("task", row["title"]), row.get("group", ""),
                           method, _fmt(cell["mean"], 2), _fmt(cell["std"], 2),
                           cell.get("seeds", ""), best.get("lr", ""),
                           best.get("weight_decay", ""),
                           _fmt(100 * best["val_top1"], 2) if best else "",
                           _fmt(cell["paper"], 2), _fmt(cell["diff"], 2, sign=True)])


def plot_bars(path: str, kind: str, summaries: list[dict]) -> Optional[str]:
  """Per-task bars per method (error bars: std over seeds; x: the paper)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  methods, rows = table_rows(kind, summaries)
  rows = [r for r in rows if any(c["mean"] is not None for c in r["cells"].values())]
  if not rows:
    return None
  width = 0.8 / len(methods)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * max(1, len(methods)) + 2), 4.5))
  x = np.arange(len(rows))
  for i, method in enumerate(methods):
    cells = [r["cells"][method] for r in rows]
    means = [c["mean"] if c["mean"] is not None else 0.0 for c in cells]
    stds = [c["std"] or 0.0 for c in cells]
    offset = x - 0.4 + (i + 0.5) * width
    ax.bar(offset, means, width, yerr=stds, capsize=2, label=method)
    papers = [(o, c["paper"]) for o, c in zip(offset, cells) if c["paper"] is not None]
    if papers:
      ax.scatter(*zip(*papers), marker="x", color="black", zorder=3,
                 label="paper (recalled)" if i == 0 else None)
  ax.set_xticks(x)
  ax.set_xticklabels([r["title"] for r in rows], rotation=45, ha="right")
  ax.set_ylabel("test top-1 (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"{kind.upper() if kind != 'custom' else 'Other tasks'}: last-epoch test "
               "top-1, mean ± std over seeds")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(path: str, method: str, summaries: list[dict]) -> Optional[str]:
  """Training loss of every final run of one method, one panel per task."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = []
  for summary in summaries:
    if summary["method"] != method:
      continue
    final_dir = os.path.join(summary["folder"], "final")
    curves = {}
    for seed_dir in sorted(os.listdir(final_dir)) if os.path.isdir(final_dir) else []:
      records = [r for r in read_metrics(os.path.join(final_dir, seed_dir))
                 if "train/loss" in r]
      if records:
        curves[seed_dir] = ([r["step"] for r in records], [r["train/loss"] for r in records])
    if curves:
      panels.append((summary["task"], curves))
  if not panels:
    return None
  cols = min(5, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
  for ax, (task, curves) in zip(axes.flat, panels):
    for seed, (steps, losses) in curves.items():
      ax.plot(steps, losses, label=seed, linewidth=1)
    ax.set_title(task, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("train loss", fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=6)
  fig.suptitle(f"{method}: training loss of the final runs")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(results_dir: str, out_dir: Optional[str] = None,
                 extra_dirs: tuple[str, ...] = ()) -> str:
  """Writes report.md, results.csv and the plots; returns report.md's path."""
  out_dir = out_dir or os.path.join(results_dir, "report")
  os.makedirs(out_dir, exist_ok=True)
  summaries = collect([results_dir, *extra_dirs])
  lines = [f"# Results: {results_dir}", "",
           "Test top-1 (%) at the last epoch, mean ± std over the final seeds; "
           "hyper-parameters chosen on the validation split at the last epoch. "
           "'paper' is the VPT paper's number for the same method (ViT-B/16 "
           f"ImageNet-21k): {hparams.PAPER_SOURCE}; Δ = ours − paper. Group and "
           "overall means use only the tasks with results (counts shown); the paper's "
           "means are taken over the same tasks.", ""]
  images = []
  records = final_runs.records(summaries)  # each final run.json read once
  data = data_checks.statuses(summaries, methods=_methods(summaries), records=records)
  for kind, title in (("vtab", "VTAB-1k"), ("fgvc", "FGVC"), ("custom", "Other tasks")):
    if not any(_kind(s["task"]) == kind for s in summaries):
      continue
    lines += [f"## {title}", "", markdown_table(kind, summaries, data), ""]
    bars = plot_bars(os.path.join(out_dir, f"bars_{kind}.png"), kind, summaries)
    if bars:
      lines += [f"![{title} bars]({os.path.basename(bars)})", ""]
      images.append(bars)
    lines += cost_table.section([s for s in summaries if _kind(s["task"]) == kind],
                                _methods(summaries), title,
                                os.path.join(out_dir, f"params_vs_accuracy_{kind}.png"),
                                records)
  few_shot_lines = few_shot_report.section([results_dir, *extra_dirs], out_dir)
  if not summaries and not few_shot_lines:
    lines.append("No summary.json found yet: run the protocol first.")
  for method in _methods(summaries):
    curves = plot_curves(os.path.join(out_dir, f"curves_{method}.png"), method, summaries)
    if curves:
      lines += [f"![{method} curves]({os.path.basename(curves)})", ""]
  lines += few_shot_lines + _checks(summaries, data, out_dir)
  pending = [f"{s['task']} ({s['method']})" for s in summaries if not s["complete"]]
  if pending:
    lines += ["Incomplete (runs missing or waiting): " + ", ".join(pending), ""]
  write_csv(os.path.join(out_dir, "results.csv"), summaries)
  cost_table.write_csv(os.path.join(out_dir, "costs.csv"), summaries, records)
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def _checks(summaries: list[dict], data: dict, out_dir: str) -> list[str]:
  """report.md's data and differences sections; writes per_class.md."""
  lines = []
  if data:
    lines += ["## Data", "", data_checks.markdown(data), ""]
  methods = _methods(summaries)
  correct = comparisons.test_predictions(summaries)  # each run's predictions, read once
  differences = comparisons.markdown(summaries, methods, correct)
  if differences:
    lines += ["## Differences between methods", "", differences, ""]
  per_class = comparisons.per_class(summaries, methods, correct)
  if per_class:
    with open(os.path.join(out_dir, "per_class.md"), "w") as f:
      f.write("# Per-class test accuracy (%, mean over seeds; from the saved "
              "predictions)\n\n" + per_class + "\n")
    lines += ["Per-class test accuracy: [per_class.md](per_class.md)", ""]
  return lines


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m vpt_jax.protocol.report",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("results_dirs", nargs="+", help="protocol workdirs (one per method "
                      "or all methods in one)")
  parser.add_argument("--out", default=None, help="default: FIRST_DIR/report")
  args = parser.parse_args(argv)
  path = write_report(args.results_dirs[0], args.out, tuple(args.results_dirs[1:]))
  print(open(path).read())
  print(f"\nwritten: {os.path.dirname(path)}")


if __name__ == "__main__":
  main()
