"""Trainable versus frozen: regex rules over parameter paths -> labels.

Labels feed ``optax.partition``; frozen leaves get ``optax.set_to_zero()`` and
therefore no optimizer state. Gradients are only ever taken with respect to the
trainable leaves, so no FLOPs are spent on frozen weight gradients.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from vpt_jax import errors
from vpt_jax.params.trees import flatten, unflatten

TRAIN = "train"
FROZEN = "frozen"
LABELS = (TRAIN, FROZEN)


def label_params(params, rules: Sequence[Sequence[str]]) -> dict:
  """Labels every leaf with the first rule whose regex fully matches its path.

  Args:
    params: nested dict of arrays (or shapes).
    rules: ordered (regex, label) pairs, label in ("train", "frozen").

  Returns:
    A nested dict with the structure of ``params`` holding labels.

  Raises:
    ValueError: a rule has an unknown label or bad regex, or some parameter
      matches no rule (all unmatched paths are named).
  """
  compiled = []
  for rule in rules:
    if len(rule) != 2 or rule[1] not in LABELS:
      raise errors.UserError(f"Bad trainable rule {tuple(rule)!r}: expected (regex, label) "
                             f"with label in {LABELS}")
    try:
      compiled.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise errors.UserError(f"Bad regex {rule[0]!r} in trainable rules: {e}") from e
  labels, unmatched = {}, []
  for path in flatten(params):
    label = next((lab for regex, lab in compiled if regex.fullmatch(path)), None)
    if label is None:
      unmatched.append(path)
    labels[path] = label
  if unmatched:
    raise errors.UserError(
        f"{len(unmatched)} parameters match no trainable rule: "
        f"{', '.join(sorted(unmatched)[:20])}{' ...' if len(unmatched) > 20 else ''}. "
        "Add a rule for them, e.g. ('.*', 'frozen') as the last rule.")
  return unflatten(labels)


def split(params, labels) -> tuple[dict, dict]:
  """Splits params into (trainable, frozen) flat dicts keyed by path."""
  flat_labels = flatten(labels)
  trainable, frozen = {}, {}
  for path, value in flatten(params).items():
    (trainable if flat_labels[path] == TRAIN else frozen)[path] = value
  return trainable, frozen


def merge(*flat_parts: dict) -> dict:
  """Merges flat dicts (disjoint paths) back into one nested dict."""
  merged = {}
  for part in flat_parts:
    merged.update(part)
  return unflatten(merged)


def count(flat: dict | Iterable) -> int:
  """Number of scalars in a flat dict of arrays."""
  values = flat.values() if isinstance(flat, dict) else flat
  total = 0
  for value in values:
    size = 1
    for dim in value.shape:
      size *= dim
    total += size
  return total
