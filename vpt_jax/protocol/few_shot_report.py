"""The report's few-shot and domain-generalisation sections (``few_shot_protocol``).

From every ``few_shot.json`` below the results folders:

* per dataset a shots x method table of test top-1 (%, mean ± std over the
  draws) and ``few_shot_curves.png``: accuracy against shots (log scale), one
  panel per dataset, one line per method, error bars the std over draws;
* with targets, a source-versus-target table per method and shot count:
  ImageNet (the source's test split), ImageNet-V2, -Sketch, -A, -R and the mean
  of the targets. -A and -R cells show the 200-class number with NOAH's
  1000-way one in brackets;
* ``few_shot.csv``: the same numbers, one row per dataset, method, shots and split.
"""

from __future__ import annotations

import csv
import os
from typing import Optional

import numpy as np

from vpt_jax.data import few_shot
from vpt_jax.data import imagenet_shifts
from vpt_jax.protocol import run_records

SUMMARY_FILE = "few_shot.json"  # one per dataset and method (few_shot_protocol.summarize)


def collect(results_dirs: list[str]) -> list[dict]:
  """Every few_shot.json below the folders."""
  return [summary for _, summary in run_records.json_files_below(results_dirs, SUMMARY_FILE)]


def _cell(mean: Optional[float], std: Optional[float], done: int = 0, planned: int = 0) -> str:
  if mean is None:
    return "–"
  text = f"{100 * mean:.1f} ± {100 * std:.1f}"
  return text + (f" ({done}/{planned} draws)" if done < planned else "")


def _order(summaries: list[dict]) -> tuple[list[str], list[str]]:
  """(datasets in registry order, methods in first-seen order)."""
  present = {s["dataset"] for s in summaries}
  datasets = [d for d in few_shot.DATASETS if d in present]
  return datasets, list(dict.fromkeys(s["method"] for s in summaries))


def shots_table(dataset: str, summaries: list[dict]) -> str:
  """Markdown: rows shot counts, columns methods, cells mean ± std (%)."""
  mine = {s["method"]: s for s in summaries if s["dataset"] == dataset}
  methods = list(mine)
  shots = sorted({int(n) for s in mine.values() for n in s["shots"]})
  lines = ["| shots | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
  for n in shots:
    cells = []
    for method in methods:
      entry = mine[method]["shots"].get(str(n))
      cells.append(_cell(entry["mean"], entry["std"], entry["num_seeds"], entry["planned"])
                   if entry else "–")
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_curves(path: str, summaries: list[dict]) -> Optional[str]:
  """Accuracy against shots, one panel per dataset, one line per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  datasets, methods = _order(summaries)
  if not datasets:
    return None
  fig, axes = plt.subplots(1, len(datasets), figsize=(3.4 * len(datasets), 3.0),
                           squeeze=False)
  for ax, dataset in zip(axes.flat, datasets):
    for method in methods:
      summary = next((s for s in summaries
                      if (s["dataset"], s["method"]) == (dataset, method)), None)
      points = sorted((int(n), e) for n, e in (summary or {"shots": {}})["shots"].items()
                      if e["mean"] is not None)
      if points:
        ax.errorbar([n for n, _ in points], [100 * e["mean"] for _, e in points],
                    yerr=[100 * e["std"] for _, e in points], marker="o", capsize=2,
                    label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(few_shot.SHOTS), [str(n) for n in few_shot.SHOTS])
    ax.set_title(few_shot.DATASETS[dataset].title, fontsize=9)
    ax.set_xlabel("shots per class", fontsize=8)
    ax.set_ylabel("test top-1 (%)", fontsize=8)
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _target_cell(scores: Optional[dict], target: imagenet_shifts.ShiftTarget) -> str:
  if not scores or scores["top1"]["mean"] is None:
    return "–"
  text = _cell(scores["top1"]["mean"], scores["top1"]["std"])
  if target.classes is not None:
    text += f" (1000-way {100 * scores['top1_1000way']['mean']:.1f})"
  return text


def targets_table(summaries: list[dict]) -> Optional[str]:
  """Markdown: per method and shot count, the source and each target (%), or None."""
  rows = []
  targets = list(imagenet_shifts.TARGETS.values())
  for summary in summaries:
    for n, entry in sorted(summary["shots"].items(), key=lambda kv: int(kv[0])):
      if not entry.get("targets"):
        continue
      means = [entry["targets"][t.name]["top1"]["mean"] for t in targets
               if t.name in entry["targets"]]
      cells = ([summary["method"], n, _cell(entry["mean"], entry["std"])]
               + [_target_cell(entry["targets"].get(t.name), t) for t in targets]
               + [f"{100 * np.mean(means):.1f}" if len(means) == len(targets) else "–"])
      rows.append("| " + " | ".join(cells) + " |")
  if not rows:
    return None
  header = (["method", "shots", "ImageNet (source)"] + [t.title for t in targets]
            + ["targets mean"])
  return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + rows)


def write_csv(path: str, summaries: list[dict]) -> None:
  """few_shot.csv: one row per dataset, method, shot count and scored split (%)."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["dataset", "method", "shots", "split", "top1_mean", "top1_std", "draws",
                     "top1_1000way_mean"])
    for summary in summaries:
      for n, entry in sorted(summary["shots"].items(), key=lambda kv: int(kv[0])):
        rows = [("test", entry, entry["num_seeds"], None)] + [
            (name, scores["top1"], scores["num_seeds"], scores["top1_1000way"]["mean"])
            for name, scores in entry.get("targets", {}).items()]
        for split, stats, draws, full in rows:
          if stats["mean"] is not None:
            writer.writerow([summary["dataset"], summary["method"], n, split,
                             f"{100 * stats['mean']:.2f}", f"{100 * stats['std']:.2f}", draws,
                             "" if full is None else f"{100 * full:.2f}"])


def section(results_dirs: list[str], out_dir: str) -> list[str]:
  """report.md's few-shot and domain-generalisation lines (none without results)."""
  summaries = collect(results_dirs)
  if not summaries:
    return []
  write_csv(os.path.join(out_dir, "few_shot.csv"), summaries)
  lines = ["## Few-shot (NOAH's protocol)", "",
           "Test top-1 (%) at the last epoch, mean ± std over the draws of the shots "
           "(data/few_shot.py: NOAH's list files, or drawn from TFDS by the documented "
           "rule; the training seed is fixed, as NOAH's). Every method runs with the same "
           "settings; NOAH's timm augmentations (RandAugment, mixup, cutmix, label "
           "smoothing, random erasing) are not reproduced.", ""]
  datasets, _ = _order(summaries)
  for dataset in datasets:
    sources = sorted({s.get("shots_from", "?") for s in summaries if s["dataset"] == dataset})
    lines += [f"### {few_shot.DATASETS[dataset].title} (shots: {', '.join(sources)})", "",
              shots_table(dataset, summaries), ""]
  curves = plot_curves(os.path.join(out_dir, "few_shot_curves.png"), summaries)
  if curves:
    lines += [f"![few-shot curves]({os.path.basename(curves)})", ""]
  targets = targets_table(summaries)
  if targets:
    lines += ["## Domain generalisation", "",
              "Trained on few-shot ImageNet-1k, scored on its validation set (source) and "
              "the shifted test sets; ImageNet-A/-R: argmax among their 200 classes (in "
              "brackets: over all 1000, as NOAH evaluates).", "", targets, ""]
  return lines
