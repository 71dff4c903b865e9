"""Whether the report's results read the canonical data, and each other's.

Every final run records the fingerprint of each split it read
(``results["data"]`` in run.json: ``data.fingerprints``). The report compares
them with the canonical fingerprints of ``data_fingerprints.json`` (the VTAB-1k
splits at the pinned TFDS versions, made by ``python -m
vpt_jax.data.fingerprints vtab``) and with the other final runs of the same
task (every method and seed), and says how they differ: counts, labels,
pixels, ids, order. A task without a canonical fingerprint is "unverified".
"""

from __future__ import annotations

import json
import os
from typing import Optional

from vpt_jax.data import fingerprints
from vpt_jax.protocol import final_runs

CANONICAL_FILE = os.path.join(os.path.dirname(__file__), "data_fingerprints.json")
ROLES = ("train", "test")


def load_canonical(path: str = CANONICAL_FILE) -> dict:
  """{task: {split name: fingerprint}} of the canonical file ({} if it holds none)."""
  with open(path) as f:
    return json.load(f).get("fingerprints", {})


def _runs_data(seed_records: dict[int, Optional[dict]]) -> list[tuple[int, Optional[dict]]]:
  """[(seed, results["data"] or None)] of a summary's finished final runs
  (``final_runs.records``: {seed: run.json or None})."""
  return [(seed, (record or {}).get("results", {}).get("data"))
          for seed, record in seed_records.items()]


def _reference(task_runs: list[tuple[str, int, dict]], role: str):
  """The task's most common ``role`` fingerprint (ties: the earliest run) and the
  first run that has it: (name, fingerprint), or (None, None)."""
  recorded = [(f"{method} seed {seed}", data[role]) for method, seed, data in task_runs
              if data and role in data]
  if not recorded:
    return None, None
  keys = [json.dumps(fp, sort_keys=True) for _, fp in recorded]
  best = max(range(len(keys)), key=lambda i: (keys.count(keys[i]), -i))
  return recorded[best]


def status(summary: dict, canonical: dict, references: dict, runs: list) -> dict:
  """{"state", "details"} of one (task, method): its runs' data against the
  canonical fingerprints and against the task's most common one.

  ``references``: {role: the task's ``_reference``}; ``runs``: the summary's ``_runs_data``.

  state: "matches" (every recorded split equals the canonical one),
  "differs" (from the canonical data or another run), "unverified" (no
  canonical fingerprint, runs agree) or "unrecorded" (no fingerprints).
  """
  if not runs or all(data is None for _, data in runs):
    return {"state": "unrecorded", "details": []}
  found_by_seed, verified = {}, True  # message -> seeds that show it
  for seed, data in runs:
    for role in ROLES:
      if not data or role not in data:
        continue
      ours = data[role]
      reference = canonical.get(summary["task"], {}).get(ours.get("split"))
      if reference is None:
        verified = False
      else:
        found = fingerprints.differences(ours, reference)
        # Pixels made at another size are not comparable: only counts and labels are.
        verified = verified and not any(d.startswith("preprocessing") for d in found)
        for d in found:
          if not d.startswith("preprocessing"):
            found_by_seed.setdefault(f"{role} vs canonical {ours['split']}: {d}", []).append(seed)
      name, first = references[role]
      for d in fingerprints.differences(ours, first) if first is not None else []:
        found_by_seed.setdefault(f"{role} vs {name}: {d}", []).append(seed)
  details = [f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} {message}"
             for message, seeds in found_by_seed.items()]
  state = "differs" if details else ("matches" if verified else "unverified")
  return {"state": state, "details": details}


def statuses(summaries: list[dict], canonical: Optional[dict] = None,
             methods: Optional[list[str]] = None, records: Optional[dict] = None) -> dict:
  """{(task, method): ``status``} of every summary.

  ``methods``: the report's method order, which breaks ties between the task's
  fingerprints (default: the summaries' order). ``records``: the summaries'
  ``final_runs.records`` if already read (default: read here).
  """
  canonical = load_canonical() if canonical is None else canonical
  records = final_runs.records(summaries) if records is None else records
  if methods:
    summaries = sorted(summaries, key=lambda s: methods.index(s["method"])
                       if s["method"] in methods else len(methods))
  runs = {id(s): _runs_data(records[id(s)]) for s in summaries}
  task_runs: dict[str, list] = {}
  for summary in summaries:
    task_runs.setdefault(summary["task"], []).extend(
        (summary["method"], seed, data) for seed, data in runs[id(summary)])
  # Each task's references: the same for all its methods and seeds, so found once.
  references = {task: {role: _reference(found, role) for role in ROLES}
                for task, found in task_runs.items()}
  return {(s["task"], s["method"]): status(s, canonical, references[s["task"]], runs[id(s)])
          for s in summaries}


def markdown(found: dict) -> str:
  """The report's data section: one row per (task, method)."""
  lines = ["Fingerprints of the splits each final run read (count, class histogram, "
           "hashes of ids, labels and resized pixels; vpt_jax/data/fingerprints.py) against "
           "the canonical ones (vpt_jax/protocol/data_fingerprints.json) and the task's "
           "other runs. *unverified*: no canonical fingerprint for the split (see the "
           "README: Data fingerprints).", "",
           "| task | method | data | how it differs |", "|---|---|---|---|"]
  for (task, method), found_status in sorted(found.items()):
    details = found_status["details"]
    shown = "; ".join(details[:3]) + (f"; +{len(details) - 3} more" if len(details) > 3 else "")
    lines.append(f"| {task} | {method} | {found_status['state']} | {shown} |")
  return "\n".join(lines)
