"""training/e2vpt_masks (--mode e2vpt_masks): E2VPT's pruning step between its
trainings, on a tiny run: the written levels prune the lowest scores, and every
rewinding run's flags make a valid config whose masks are fixed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from run_fixtures import tiny_config
from vpt_jax.methods import factory
from vpt_jax.training import config_checks
from vpt_jax.training import e2vpt_masks
from vpt_jax.training import trainer

E2VPT = {"method": "e2vpt", "e2vpt.prune": True, "e2vpt.pieces": 4, "e2vpt.kv_prompts": 1,
         "prompt.num_prompts": 5, "optim.epochs": 1, "optim.warmup_epochs": 0,
         "data.eval_split": "", "data.test_split": ""}


def _flag_overrides(flags):
  """--config.a.b=value flags -> {"a.b": value}, booleans parsed as absl parses them."""
  overrides = {}
  for flag in flags:
    key, value = flag[len("--config."):].split("=", 1)
    overrides[key] = {"false": False, "true": True}.get(value, value)
  return overrides


def test_pruning_levels_of_a_trained_run(backbone, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(backbone, data_dir, **E2VPT)
  trainer.train_and_evaluate(config, workdir)
  result = e2vpt_masks.write_pruning_levels(config, workdir)
  with open(os.path.join(workdir, e2vpt_masks.RESULT_FILE)) as f:
    assert json.load(f) == result
  scores = np.array(result["token_scores"])
  assert len(set(scores.tolist())) == 5  # no ties: the check below can tell lowest from highest
  # 5 tokens: 0, 1, 2, 3, 4 pruned (at most 4), each the lowest scores.
  assert [len(level) for level in result["token_levels"]] == [0, 1, 2, 3, 4]
  for level in result["token_levels"]:
    kept = [i for i in range(5) if i not in level]
    assert not level or max(scores[level]) <= min(scores[kept])
  # 4 pieces with at least 4 kept: no piece is ever pruned.
  assert result["piece_levels"] == [[]]
  assert len(result["rewinding_runs"]) == 5
  rewinding = tiny_config(backbone, data_dir, **{
      **E2VPT, "e2vpt.prune": False,
      **_flag_overrides(result["rewinding_runs"][-1]["flags"])})
  spec = factory.model_spec(rewinding)
  factory.validate_spec(spec)
  assert spec["e2vpt"]["masks"]["pruned_tokens"] == result["token_levels"][-1]
  assert not spec["e2vpt"]["masks"]["learn"]


def test_refused_without_learned_masks(backbone, data_dir, tmp_path):
  config = tiny_config(backbone, data_dir)
  with pytest.raises(config_checks.ConfigError, match="e2vpt.prune=true"):
    e2vpt_masks.write_pruning_levels(config, str(tmp_path / "run"))


def test_rewinding_flags_name_every_pruned_piece():
  assert e2vpt_masks.rewinding_flags([2, 0], [[1, 3], [0, 2], [1, 0]]) == [
      "--config.e2vpt.prune=false", "--config.e2vpt.pruned_tokens=2,0",
      "--config.e2vpt.pruned_pieces=0:2;1:3 0"]
