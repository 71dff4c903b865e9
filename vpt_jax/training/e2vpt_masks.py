"""E2VPT's pruning step between its two trainings (``--mode e2vpt_masks``).

After training E2VPT with learnable masks (``e2vpt.prune=true``), this reads
the run's latest checkpoint, averages the loss gradient of every mask entry
over one epoch of the run's own training batches in eval mode (the reference's
``calculate_importance``) and writes ``WORKDIR/e2vpt_pruning.json``: the
scores, the pruned tokens and pieces of every pruning level
(``methods.e2vpt_pruning.pruning_levels``) and, per (token level, piece
level) pair, the config flags of its rewinding run (a fresh training with those
masks fixed). The reference trains every pair, keeps the best on validation
and repeats it with 5 seeds.
"""

from __future__ import annotations

import json
import math
import os

import jax
import ml_collections
import numpy as np

from vpt_jax.data import normalization as normalization_lib
from vpt_jax.methods import e2vpt_pruning
from vpt_jax.training import config_checks
from vpt_jax.training import inputs
from vpt_jax.training import setup

RESULT_FILE = "e2vpt_pruning.json"


def rewinding_flags(tokens, pieces) -> list[str]:
  """The command-line flags of one rewinding run."""
  by_token = {}
  for token, piece in pieces:
    by_token.setdefault(token, []).append(piece)
  pieces_text = ";".join(f"{t}:{' '.join(map(str, p))}" for t, p in sorted(by_token.items()))
  return ["--config.e2vpt.prune=false",
          f"--config.e2vpt.pruned_tokens={','.join(map(str, tokens))}",
          f"--config.e2vpt.pruned_pieces={pieces_text}"]


def write_pruning_levels(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores and levels of the workdir's trained masks, also written as JSON."""
  if config.method != "e2vpt" or not config.e2vpt.prune:
    raise config_checks.ConfigError("--mode e2vpt_masks reads learned E2VPT masks: use "
                                    "--config.method=e2vpt --config.e2vpt.prune=true")
  run = setup.setup_run(config, workdir)
  try:
    if run.manager.latest_step() is None:
      raise config_checks.ConfigError(f"{workdir} has no checkpoint; train it first with "
                                      "--mode train")
    params = jax.device_get(run.state["params"])
    steps = math.ceil(run.steps_per_epoch)
    batches = ((normalization_lib.normalize_images(batch["image"], **run.norm), batch["label"])
               for _, batch in zip(range(steps), inputs.batches(run.data, config, 0)))
    token_scores, piece_scores = e2vpt_pruning.mask_importance(run.model, params, batches)
  finally:
    setup.close(run)
  token_levels, piece_levels = e2vpt_pruning.pruning_levels(token_scores, piece_scores)
  result = dict(
      token_scores=np.asarray(token_scores).tolist(),
      piece_scores=np.asarray(piece_scores).tolist(),
      token_levels=token_levels, piece_levels=piece_levels,
      rewinding_runs=[dict(tokens=len(t), pieces=len(p), flags=rewinding_flags(t, p))
                      for t in token_levels for p in piece_levels])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RESULT_FILE), "w") as f:
      json.dump(result, f, indent=1)
  return result
