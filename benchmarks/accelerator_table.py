r"""Merges the logs of ``accelerator.sh`` into one markdown table.

Each log starts with ``## <benchmark> key=value ...`` (the run's tag), holds the
benchmark's own output (its first markdown table is read) and ends with
``## status ok`` or ``## status failed (code)``. One row per table row:

  benchmark | variant | batch | dtype | attention | what | img/s | GFLOP/img |
  peak GiB | temp GiB | s/step | status

``img/s`` is the train step's throughput (train_step) or the forward's
(serving); ``GFLOP/img`` is XLA's count for the compiled program divided by the
batch; ``peak GiB`` and ``temp GiB`` are the compiled train step's device bytes
(memory: arguments + temp + unaliased outputs, and the scratch alone).

  python benchmarks/accelerator_table.py /tmp/accelerator.XXXX/*.log
"""

from __future__ import annotations

import math
import sys
from typing import Iterable

COLUMNS = ("benchmark", "variant", "batch", "dtype", "attention", "what", "img/s",
           "GFLOP/img", "peak GiB", "temp GiB", "s/step", "status")


def first_table(lines: list[str]) -> list[dict[str, str]]:
  """The rows of the first markdown table in ``lines`` as {column: cell text}."""
  for i, line in enumerate(lines[:-1]):
    if line.startswith("| ") and lines[i + 1].startswith("|---"):
      header = [cell.strip() for cell in line.strip().strip("|").split("|")]
      rows = []
      for row in lines[i + 2:]:
        if not row.startswith("| "):
          break
        rows.append(dict(zip(header, (c.strip() for c in row.strip().strip("|").split("|")))))
      return rows
  return []


def _per_image(gflop: str, batch: str) -> str:
  """GFLOP per image as text; empty where the benchmark has no count ("nan")."""
  try:
    per_image = float(gflop) / int(batch)
  except ValueError:  # a missing count
    return ""
  return format(per_image, ".4g") if math.isfinite(per_image) else ""


def log_rows(text: str) -> list[dict[str, str]]:
  """The merged-table rows of one ``accelerator.sh`` log."""
  lines = text.splitlines()
  benchmark, *pairs = lines[0].removeprefix("## ").split()
  tag = dict(pair.split("=", 1) for pair in pairs)
  status = next((l.removeprefix("## status ") for l in reversed(lines)
                 if l.startswith("## status ")), "unfinished")
  base = {"benchmark": benchmark, "variant": tag.get("variant", ""),
          "batch": tag.get("batch", ""), "dtype": tag.get("dtype", ""),
          "attention": tag.get("attention", ""), "status": status}
  rows = []
  for cells in first_table(lines):
    row = dict(base)
    if benchmark == "train_step":
      row.update(what=cells["method"], **{"img/s": cells["img/s"], "s/step": cells["s/step"]})
      row["GFLOP/img"] = _per_image(cells["GFLOP"], base["batch"])
    elif benchmark == "serving":
      row.update(what=cells["batch"], **{"img/s": cells["forward img/s"]})
      row["GFLOP/img"] = _per_image(cells["GFLOP"], base["batch"])
    else:  # memory: one row per dtype x remat
      row.update(what=f"{tag.get('method', '')} remat={cells['remat']}", dtype=cells["dtype"],
                 **{"peak GiB": cells["peak GiB"], "temp GiB": cells["temp GiB"]})
      row["GFLOP/img"] = _per_image(cells["GFLOP"], base["batch"])
    rows.append(row)
  return rows or [dict(base, what="(no table: see the log)")]


def merged_table(texts: Iterable[str]) -> str:
  """One markdown table over every log's rows, in the logs' order."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for text in texts:
    for row in log_rows(text):
      lines.append("| " + " | ".join(row.get(column, "") for column in COLUMNS) + " |")
  return "\n".join(lines)


def main(paths: list[str]) -> None:
  texts = []
  for path in paths:
    with open(path) as f:
      texts.append(f.read())
  print(merged_table(texts))


if __name__ == "__main__":
  main(sys.argv[1:])
