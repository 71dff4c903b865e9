"""The report's cost columns: what each method's final runs measured, and V-PETL's PPT.

Every final run records its costs (results["cost"] in run.json,
``training/costs.py``). Per task and method the seeds are averaged
(``task_costs``, written to costs.csv); per benchmark and method the tasks are
averaged (``method_rows``) and shown beside the mean test top-1 and the
parameter-performance trade-off score of V-PETL Bench (Xin et al., 2024),

  PPT = (M / 100) * exp(-log10(P / C + 1)),  C = 10^7,

with M the mean test top-1 (%) over the benchmark's tasks and P the trainable
parameters without the head (mean over the tasks). The formula reproduces the
PPT column of synbol/Parameter-Efficient-Transfer-Learning-Benchmark's README
tables from their Mean and Params columns (e.g. VPT-Deep on VTAB: 69.43 and
0.56M give 0.68); its repository states no formula in code.
"""

from __future__ import annotations

import csv
import math
from typing import Optional

import numpy as np

from vpt_jax.protocol import final_runs

PPT_C = 1e7
# Numeric cost fields averaged over seeds and tasks.
FIELDS = ("trainable_params", "trainable_params_without_head", "export_bytes",
          "train_images_per_s", "peak_memory_bytes", "inference_images_per_s",
          "flops_per_image")


def ppt(mean_top1: float, params_without_head: float) -> float:
  """V-PETL Bench's parameter-performance trade-off (module docstring); top-1 in %."""
  return mean_top1 / 100 * math.exp(-math.log10(params_without_head / PPT_C + 1))


def _mean(values: list) -> Optional[float]:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def task_costs(seed_records: dict[int, Optional[dict]]) -> Optional[dict]:
  """The seeds' mean of each cost field, "mergeable" and the devices; None if unrecorded.

  ``seed_records``: one task's final runs, {seed: run.json or None} (``final_runs.records``).
  """
  recorded = [record["results"]["cost"] for record in seed_records.values()
              if "cost" in (record or {}).get("results", {})]
  if not recorded:
    return None
  out = {field: _mean([c.get(field) for c in recorded]) for field in FIELDS}
  out["mergeable"] = recorded[0].get("mergeable")
  out["device"] = sorted({"{kind} x{count}".format(**c["device"]) for c in recorded
                          if c.get("device")})
  out["memory_kind"] = recorded[0].get("memory_kind")
  return out


def method_rows(summaries: list[dict], methods: list[str],
                records: Optional[dict] = None) -> list[dict]:
  """Per method (in order): its tasks' mean costs, mean test top-1 (%) and PPT.

  ``records``: the summaries' ``final_runs.records`` if already read (default: read here).
  """
  records = final_runs.records(summaries) if records is None else records
  rows = []
  for method in methods:
    mine = [s for s in summaries if s["method"] == method and s["test_top1_mean"] is not None]
    found = [(s, task_costs(records[id(s)])) for s in mine]
    found = [(s, c) for s, c in found if c is not None]
    if not found:
      continue
    row = {"method": method, "tasks": len(found),
           "top1": 100 * float(np.mean([s["test_top1_mean"] for s, _ in found]))}
    row.update({field: _mean([c[field] for _, c in found]) for field in FIELDS})
    row["mergeable"] = found[0][1]["mergeable"]
    row["device"] = sorted({d for _, c in found for d in c["device"]})
    params = row["trainable_params_without_head"]
    row["ppt"] = None if params is None else ppt(row["top1"], params)
    rows.append(row)
  return rows


def _num(value: Optional[float], scale: float = 1.0, digits: int = 2) -> str:
  return "–" if value is None else f"{value / scale:,.{digits}f}"


def markdown(rows: list[dict]) -> str:
  """One benchmark's cost table (``method_rows``)."""
  lines = ["| method | tasks | top-1 (%) | PPT | trainable (M) | without head (M) | "
           "export (MB) | train img/s | peak memory (GB) | inference img/s | GFLOPs/img | "
           "mergeable | device |", "|---|" + "---|" * 12]
  for r in rows:
    merge = {True: "yes", False: "no"}.get(r["mergeable"], "?")
    lines.append(
        f"| {r['method']} | {r['tasks']} | {r['top1']:.2f} | {_num(r['ppt'])} | "
        f"{_num(r['trainable_params'], 1e6, 3)} | "
        f"{_num(r['trainable_params_without_head'], 1e6, 3)} | "
        f"{_num(r['export_bytes'], 1e6)} | {_num(r['train_images_per_s'], 1, 1)} | "
        f"{_num(r['peak_memory_bytes'], 1e9)} | {_num(r['inference_images_per_s'], 1, 1)} | "
        f"{_num(r['flops_per_image'], 1e9, 3)} | {merge} | {', '.join(r['device'])} |")
  return "\n".join(lines)


def write_csv(path: str, summaries: list[dict], records: Optional[dict] = None) -> None:
  """costs.csv: one row per task and method, the seeds' means (``records`` as ``method_rows``)."""
  records = final_runs.records(summaries) if records is None else records
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["task", "method", *FIELDS, "mergeable", "device"])
    for summary in summaries:
      found = task_costs(records[id(summary)])
      if found is not None:
        writer.writerow([summary["task"], summary["method"],
                         *["" if found[k] is None else f"{found[k]:.6g}" for k in FIELDS],
                         found["mergeable"], "; ".join(found["device"])])


def plot(path: str, title: str, rows: list[dict]) -> Optional[str]:
  """Mean test top-1 against trainable parameters (without head, log scale), per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  points = [r for r in rows if r["trainable_params_without_head"] is not None]
  if not points:
    return None
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for r in points:
    # log axis: a head-only method (0 parameters outside the head) sits at 1.
    x = max(r["trainable_params_without_head"], 1.0)
    ax.scatter([x], [r["top1"]], label=r["method"])
    ax.annotate(r["method"], (x, r["top1"]), fontsize=8, xytext=(3, 3),
                textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters without the head (log; 0 shown at 1)")
  ax.set_ylabel("mean test top-1 (%)")
  ax.set_title(f"{title}: accuracy vs trainable parameters")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def section(summaries: list[dict], methods: list[str], title: str, plot_path: str,
            records: Optional[dict] = None) -> list[str]:
  """report.md's lines for one benchmark's costs (and its plot); [] if none recorded.

  ``records`` as ``method_rows``.
  """
  rows = method_rows(summaries, methods, records)
  if not rows:
    return []
  lines = [f"### {title}: costs", "",
           "Means over the tasks (each the mean over its final seeds) of what the runs "
           "measured (vpt_jax/training/costs.py); PPT = (top-1 / 100) · exp(−log10(P / 10^7 "
           "+ 1)), P = trainable parameters without the head (V-PETL Bench).", "",
           markdown(rows), ""]
  if plot(plot_path, title, rows):
    lines += [f"![{title} accuracy vs parameters]({plot_path.split('/')[-1]})", ""]
  return lines
