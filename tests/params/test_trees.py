"""Flat `/`-joined parameter paths and nested trees."""

from __future__ import annotations

import pytest

from vpt_jax.params.trees import flatten, unflatten


def test_flatten_unflatten():
  tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
  assert flatten(tree) == {"a/b": 1, "a/c/d": 2, "e": 3}
  assert unflatten(flatten(tree)) == tree
  with pytest.raises(ValueError, match="both a leaf and"):
    unflatten({"a": 1, "a/b": 2})
  with pytest.raises(ValueError, match="without '/'"):
    flatten({"a/b": 1})

