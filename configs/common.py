"""The base config of one training run, and the "key=value" argument parser.

A config file's ``get_config(arg)`` starts from ``base_config()`` and sets the
fields its argument string names; everything can still be overridden on the
command line (``--config.optim.base_lr=0.5``). Configs are locked: a misspelt
key fails instead of being silently added.
"""

from __future__ import annotations

import difflib

import ml_collections

from vpt_jax.models import methods


def base_config() -> ml_collections.ConfigDict:
  """Every field of a single run, with the VPT reference's defaults."""
  config = ml_collections.ConfigDict()
  config.seed = 42
  config.method = "vpt_deep"
  # Ordered (regex, "train"|"frozen") rules over parameter paths; empty means
  # the method's own rules.
  config.trainable_rules = ()

  config.model = ml_collections.ConfigDict()
  config.model.variant = "B/16"
  config.model.image_size = 224
  config.model.dropout_rate = 0.1
  config.model.skip_dead_work = True
  config.model.dtype = "float32"
  # Backbone .npz (local path or gs://); empty trains from scratch.
  config.model.init_checkpoint = ""

  config.prompt = ml_collections.ConfigDict()
  config.prompt.num_prompts = 50
  config.prompt.dropout = 0.1
  config.prompt.projection = -1
  config.prompt.pool = "original"

  config.data = ml_collections.ConfigDict()
  config.data.builder = ""          # TFDS name[/config][:version]
  config.data.data_dir = ""         # TFDS data_dir; empty = TFDS default
  config.data.train_split = "train[:800]+validation[:200]"
  config.data.eval_split = ""       # evaluated every eval.every_epochs ("" = none)
  config.data.test_split = "test"   # evaluated at the end and reported
  config.data.image_key = "image"
  config.data.label_key = "label"
  config.data.num_classes = 0       # 0 = from the dataset's metadata
  config.data.resize = "tf1_bilinear"
  config.data.normalization = "imagenet"  # imagenet | minus_one_to_one

  config.optim = ml_collections.ConfigDict()
  config.optim.name = ""            # "" = the method's default (sgd | adamw)
  config.optim.base_lr = 0.1        # scaled by batch_size / 256
  config.optim.weight_decay = 1e-4
  config.optim.momentum = 0.9
  config.optim.batch_size = 128
  config.optim.epochs = 100
  config.optim.warmup_epochs = 10
  config.optim.schedule_unit = "epoch"  # epoch (reference) | step

  config.eval = ml_collections.ConfigDict()
  config.eval.every_epochs = 0      # 0 = only at the end
  config.eval.batch_size = 256

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 500
  config.checkpoint.keep = 2

  config.log_every_steps = 20
  config.export = True
  # Files to classify in predict mode (comma-separated paths) and the export to use.
  config.predict = ml_collections.ConfigDict()
  config.predict.images = ""
  config.predict.export_dir = ""
  return config


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parses "key=value,flag,..." into a ConfigDict typed by ``defaults``.

  A bare key sets a boolean to True. Unknown keys fail with the valid ones.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      close = difflib.get_close_matches(key, defaults, n=1)
      raise ValueError(f"Unknown config argument {key!r}"
                       + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; valid: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if not sep:
      value = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key} expects true/false, got {value!r}")
      value = value.lower() in ("true", "1")
    elif default is not None:
      value = type(default)(value)
    parsed[key] = value
  return parsed


def apply_method(config: ml_collections.ConfigDict, method: str) -> None:
  """Sets the method and the reference's per-method defaults (vpt.md 2, 5.4)."""
  spec = methods.get_method(method)
  config.method = method
  if method == "vpt_shallow":
    config.prompt.dropout = 0.0  # the reference uses no dropout for VPT-shallow
  if spec.optimizer == "adamw":
    config.optim.warmup_epochs = 5
