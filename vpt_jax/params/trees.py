"""Flat `/`-joined views of nested parameter dicts.

Parameter paths are written without a leading slash, e.g.
``Transformer/encoderblock_0/LayerNorm_0/scale``, the convention regexes such as
``fresh=`` patterns are matched against (with ``re.fullmatch``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SEP = "/"


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}. Empty sub-dicts disappear (they hold no leaf).

  Raises:
    ValueError: a key is not a string or contains "/" (the path would be ambiguous).
  """
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      if not isinstance(key, str) or SEP in key or not key:
        raise ValueError(f"cannot flatten key {key!r} under {prefix or '<root>'!r}: "
                         f"keys must be non-empty strings without {SEP!r}")
      path = f"{prefix}{SEP}{key}" if prefix else key
      if isinstance(value, Mapping):
        visit(value, path)
      else:
        flat[path] = value

  visit(tree, "")
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} -> nested dict; the inverse of `flatten`.

  Raises:
    ValueError: one path is both a leaf and a prefix of another path.
  """
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split(SEP)
    node = tree
    for i, name in enumerate(parents):
      child = node.setdefault(name, {})
      if not isinstance(child, dict):
        raise ValueError(f"{SEP.join(parents[:i + 1])!r} is both a leaf and the "
                         f"parent of {path!r}")
      node = child
    if leaf in node:
      raise ValueError(f"{path!r} is both a leaf and the parent of other paths "
                       f"(or appears twice)")
    node[leaf] = value
  return tree
