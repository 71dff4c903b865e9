"""A tiny training run on the sprites builder, shared by the training tests."""

import json
import os

from configs import common
from vpt_jax.export import task_export


def tiny_config(backbone_path, data_dir, **overrides):
  """VPT-deep on test/4 at 32 px, vpt_sprites/tiny (count), 3 epochs of batch 8, locked."""
  config = common.base_config()
  config.model.variant = "test/4"
  config.model.image_size = 32
  config.model.init_checkpoint = backbone_path
  config.prompt.num_prompts = 2
  config.data.builder = "vpt_sprites/tiny"
  config.data.data_dir = data_dir
  config.data.label_key = "count"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.test_split = "test"
  config.optim.batch_size = 8
  config.optim.epochs = 3
  config.optim.warmup_epochs = 1
  config.optim.base_lr = 2.0
  config.eval.batch_size = 4  # 10 test images: the last batch is padded
  config.log_every_steps = 3
  config.checkpoint.every_steps = 3
  config.checkpoint.keep = 10
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  config.lock()
  return config


def trained_params(workdir):
  """(results.json, the export's flat parameters) of a finished run."""
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  _, flat = task_export.read_export(results["export"])
  return results, flat
