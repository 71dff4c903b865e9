"""Selecting a task's best grid point and summarising its final runs.

The best point: ties go to the smaller learning rate (the reference compares
only the learning rate, so among equal scores at one learning rate the first
weight decay visited, the largest, stays). The final runs are reported as test
top-1 at the last epoch: mean and population standard deviation over seeds.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from vpt_jax.protocol import run_plan


def _top1(record: Optional[dict], split: str) -> Optional[float]:
  if record is None or record["status"] != "finished":
    return None
  return float(record["results"][split]["top1"])


def select(grid_records: list[tuple[run_plan.RunSpec, Optional[dict]]]) -> Optional[dict]:
  """The best grid point, or None while a grid run is missing.

  Visits the grid in its order (lr descending, then wd descending) and takes a
  later point only if it scores higher, or equal with a smaller lr (the
  reference's find_best_lrwd). Diverged runs score nothing.
  """
  if any(record is None for _, record in grid_records):
    return None
  best = None
  for spec, record in grid_records:
    score = _top1(record, "val")
    if score is None:
      continue
    if (best is None or score > best["val_top1"]
        or (score == best["val_top1"] and spec.lr < best["lr"])):
      best = {"lr": spec.lr, "weight_decay": spec.weight_decay, "val_top1": score}
  if best is None:
    raise run_plan.ProtocolError(f"every grid run of {grid_records[0][0].task} diverged; "
                                 "lower the learning rates (--config.protocol.lrs) and rerun")
  return best


def summarize(task: str, name: str, base_method: str, grid_records, best,
              final_records) -> dict:
  """The summary.json of one task: the grid, the choice, the seeds, mean, std."""
  tests = [_top1(record, "test") for _, record in final_records]
  done = [t for t in tests if t is not None]
  complete = best is not None and all(r is not None for _, r in final_records)
  return {
      "task": task, "method": name, "base_method": base_method,
      "grid": [{"lr": s.lr, "weight_decay": s.weight_decay, "val_top1": _top1(r, "val"),
                "status": r["status"] if r else "pending"} for s, r in grid_records],
      "best": best,
      "finals": [{"seed": s.seed, "test_top1": t,
                  "status": r["status"] if r else "pending"}
                 for (s, r), t in zip(final_records, tests)],
      "complete": complete and len(done) == len(tests),
      "test_top1_mean": float(np.mean(done)) if done else None,
      # Population std (ddof=0), as VPT's demo reports it.
      "test_top1_std": float(np.std(done)) if done else None,
      "num_seeds": len(done),
  }


def format_summaries(summaries: list[dict]) -> str:
  """One line per task: choice and final test top-1 (%)."""
  lines = ["| task | method | best lr | best wd | val200 top-1 | test top-1 (mean +- std) | "
           "seeds |", "|---|---|---|---|---|---|---|"]
  for s in summaries:
    best = s["best"] or {}
    mean = (f"{100 * s['test_top1_mean']:.2f} +- {100 * s['test_top1_std']:.2f}"
            if s["test_top1_mean"] is not None else "-")
    lines.append(f"| {s['task']} | {s['method']} | {best.get('lr', '-')} | "
                 f"{best.get('weight_decay', '-')} | "
                 + (f"{100 * best['val_top1']:.1f}" if best else "-")
                 + f" | {mean} | {s['num_seeds']}/{len(s['finals'])} |")
  return "\n".join(lines)
