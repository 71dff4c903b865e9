"""Regex rules -> trainable/frozen labels."""

import numpy as np
import pytest

from vpt_jax.params import freezing
from vpt_jax.params import trees

PARAMS = {"head": {"kernel": np.zeros((4, 2)), "bias": np.zeros(2)},
          "vpt": {"deep": np.zeros((1, 3, 4)), "shallow": np.zeros((3, 4))},
          "Transformer": {"encoder_norm": {"scale": np.ones(4), "bias": np.zeros(4)}}}


def test_first_matching_rule_wins():
  labels = freezing.label_params(
      PARAMS, (("head/bias", "frozen"), ("head/.*", "train"), ("vpt/.*", "train"),
               (".*", "frozen")))
  flat = trees.flatten(labels)
  assert flat["head/bias"] == "frozen"
  assert flat["head/kernel"] == "train"
  assert flat["vpt/deep"] == flat["vpt/shallow"] == "train"
  assert flat["Transformer/encoder_norm/scale"] == "frozen"


def test_regex_must_match_the_whole_path():
  # "vpt" alone matches no path fully; the fallback rule catches the prompts.
  labels = freezing.label_params(PARAMS, (("vpt", "train"), (".*", "frozen")))
  assert set(trees.flatten(labels).values()) == {"frozen"}


def test_unmatched_parameters_are_named():
  with pytest.raises(ValueError, match=r"2 parameters match no trainable rule: "
                     r"Transformer/encoder_norm/bias, Transformer/encoder_norm/scale"):
    freezing.label_params(PARAMS, (("head/.*", "train"), ("vpt/.*", "train")))


def test_bad_label_and_bad_regex_are_refused():
  with pytest.raises(ValueError, match="label in"):
    freezing.label_params(PARAMS, ((".*", "trainable"),))
  with pytest.raises(ValueError, match="Bad regex"):
    freezing.label_params(PARAMS, (("head/(", "train"),))


def test_split_and_merge_round_trip():
  labels = freezing.label_params(PARAMS, (("head/.*", "train"), (".*", "frozen")))
  trainable, frozen = freezing.split(PARAMS, labels)
  assert sorted(trainable) == ["head/bias", "head/kernel"]
  assert freezing.count(trainable) == 10
  merged = freezing.merge(trainable, frozen)
  assert trees.flatten(merged).keys() == trees.flatten(PARAMS).keys()
