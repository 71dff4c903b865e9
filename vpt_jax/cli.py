"""What run.py does for each mode; kept out of run.py so it can be tested."""

from __future__ import annotations

import json

import ml_collections

MODES = ("train", "evaluate", "export", "predict")


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train"):
  """Dispatches one command; returns what the mode produced."""
  # Imported here so that `run.py --help` stays fast.
  from vpt_jax.export import predict  # pylint: disable=g-import-not-at-top
  from vpt_jax.protocol import quickstart  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import trainer  # pylint: disable=g-import-not-at-top

  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; choose one of {MODES}")
  if "suite" in config:
    if mode != "train":
      raise ValueError(f"{config.suite} configs only support --mode train")
    return quickstart.run_suite(config, workdir)
  if mode == "train":
    return trainer.train_and_evaluate(config, workdir)
  if mode in ("evaluate", "export"):
    return trainer.from_checkpoint(config, workdir, mode)
  paths = [p for p in config.predict.images.split(",") if p]
  if not paths:
    raise ValueError("predict mode needs --config.predict.images=a.png,b.jpg")
  export_dir = config.predict.export_dir or f"{workdir}/export"
  results = predict.predict_files(export_dir, paths,
                                  backbone_path=config.model.init_checkpoint or None)
  for result in results:
    print(json.dumps(result))
  return results
