"""Everything about a run's config that can be checked before data or compute.

``validate_config`` refuses configs that cannot run; ``prepare_workdir`` proves
the workdir writable; ``check_resume_config`` refuses to resume a checkpoint
written by a different config and records the config as config.json.
"""

from __future__ import annotations

import json
import os

import jax
import tensorflow as tf

from vpt_jax import errors
from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.checkpoints import hub
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.data import sources
from vpt_jax.export import merging
from vpt_jax.export import stablehlo_export
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import head_init
from vpt_jax.training import optimizers
from vpt_jax.training import steps as steps_lib

# Written by ``check_resume_config``: the config of the run in the workdir.
CONFIG_FILE = "config.json"
# Fields (dotted names, as ``config_fields`` gives them; a trailing "." covers a
# section) that may differ between the run that wrote a checkpoint and a resume.
RESUME_NEUTRAL_FIELDS = ("log_every_steps", "eval.", "checkpoint.", "export",
                         "predict.", "data.data_dir",
                         # memory/time trade-offs of the same step (e.g. resuming
                         # on a smaller device): remat is exact, accumulation
                         # equal up to float summation order
                         "model.remat", "optim.accumulation_steps",
                         # the attention kernel: equal up to rounding
                         "model.attention",
                         # only permits an empty init_checkpoint (older runs lack it)
                         "model.from_scratch",
                         # the head's starting values: a resume restores the trained head
                         "head.")


class ConfigError(errors.UserError):
  """A config that cannot run; raised before any compute."""


def normalization(config) -> dict:
  """{"mean": (3,), "std": (3,)} for config.data.normalization."""
  return normalization_lib.mean_std(config.data.normalization)


def validate_config(config) -> None:
  """Everything that can be checked without data or compute."""
  method = registry.get_method(config.method)
  if config.export.merged:
    merging.check_mergeable(config.method, config.model.variant)
  factory.validate_spec(factory.model_spec(config))
  data_problem = sources.check_data_config(config.data)
  if data_problem:
    raise ConfigError(data_problem)
  _check_trainable_rules(config)
  _check_optim(config.optim, method)
  _check_ranges(config)
  normalization(config)
  _check_backbone(config.model)
  _check_side_network(config, method)
  _check_export(config)
  head_init.check_settings(config)


# The (model spec, normalisation, batch size, platforms) keys whose export trace
# passed in this process: a sweep's settings and a protocol's runs share one model,
# so one trace (1-2 s for ViT-B/16) serves them all.
_EXPORTABLE: set[str] = set()


def _check_export(config) -> None:
  """Export settings; a standalone format also traces the model (abstract weights, no data)."""
  settings = config.export
  try:
    platforms = stablehlo_export.check_settings(settings.format, settings.batch_size,
                                                settings.platforms)
    if settings.format == "npz":
      return
    spec = factory.model_spec(config)
    key = json.dumps([spec, config.data.normalization, settings.batch_size, platforms],
                     sort_keys=True)
    if key not in _EXPORTABLE:
      stablehlo_export.check_exportable(spec, normalization(config), settings.batch_size,
                                        platforms)
      _EXPORTABLE.add(key)
  except errors.UserError as e:
    raise ConfigError(str(e)) from e


def check_data(config) -> None:
  """Refuses splits that select nothing and one-class tasks, from sizes and metadata.

  A class folder run with the default (TFDS) splits gets its splits from the
  folder's layout first (``sources.derive_folder_splits``), printed.

  Cheap (no example decoded) but reads the datasets: run after ``validate_config``
  and before the first step, so a long run cannot fail at its final evaluation.
  """
  derived = sources.derive_folder_splits(config.data)
  if derived:
    print(derived)
  data_problem = sources.check_data_splits(config.data)
  if data_problem:
    raise ConfigError(data_problem)


def _check_trainable_rules(config) -> None:
  """Labels and regexes of the rules, before the model exists (it has no paths yet)."""
  try:
    freezing.label_params({}, factory.trainable_rules(config))
  except ValueError as e:
    raise ConfigError(f"{e}; fix --config.trainable_rules (or set it to () for the "
                      "method's own rules)") from e


def _check_optim(optim, method) -> None:
  if optim.name and optim.name not in optimizers.OPTIMIZERS:
    raise ConfigError(f"Unknown optim.name {optim.name!r}; choose one of "
                      f"{optimizers.OPTIMIZERS} or '' for the method's default")
  if optim.schedule_unit not in optimizers.SCHEDULE_UNITS:
    raise ConfigError(f"optim.schedule_unit must be one of {optimizers.SCHEDULE_UNITS}")
  for field in ("batch_size", "epochs"):
    if optim[field] <= 0:
      raise ConfigError(f"optim.{field}={optim[field]} must be positive; set "
                        f"--config.optim.{field} to a value above 0")
  if not 0 <= optim.warmup_epochs <= optim.epochs:
    raise ConfigError(f"optim.warmup_epochs={optim.warmup_epochs:g} must lie in [0, "
                      f"optim.epochs={optim.epochs}]; set --config.optim.warmup_epochs="
                      f"{0.1 * max(optim.epochs, 0):g} (a tenth of the epochs, as the "
                      "default 10 of 100) or 0")
  if optim.base_lr <= 0:
    raise ConfigError(f"optim.base_lr={optim.base_lr} must be positive (a learning rate "
                      "below 0 climbs the loss); set --config.optim.base_lr to a value above 0")
  if optim.weight_decay < 0:
    raise ConfigError(f"optim.weight_decay={optim.weight_decay} must be >= 0 (0 = no decay); "
                      "set --config.optim.weight_decay to 0 or above")
  if not 0 <= optim.momentum < 1:
    raise ConfigError(f"optim.momentum={optim.momentum} must lie in [0, 1); set "
                      "--config.optim.momentum (0.9 is the reference's)")
  try:
    steps_lib.check_accumulation(
        optim.accumulation_steps, optim.batch_size,
        batch_norm=method.head_hidden_layers > 0)
  except ValueError as e:
    raise ConfigError(str(e)) from e


# Rates that drop a fraction of activations: 1 would drop everything.
DROPOUT_FIELDS = ("model.dropout_rate", "prompt.dropout", "cvpt.drop_path",
                  "e2vpt.kv_dropout", "mlp.dropout")
# Counts and periods a run divides by or keeps that many of: (field, least value).
# checkpoint.keep: orbax's max_to_keep=0 would delete every save, the newest finite one too.
LEAST_VALUES = (("eval.batch_size", 1), ("eval.every_epochs", 0), ("checkpoint.keep", 1),
                ("checkpoint.every_steps", 0), ("log_every_steps", 1))


def _field(config, dotted: str):
  section, _, name = dotted.rpartition(".")
  return (config[section] if section else config)[name]


def _check_ranges(config) -> None:
  for dotted in DROPOUT_FIELDS:
    rate = _field(config, dotted)
    if not 0 <= rate < 1:
      raise ConfigError(f"{dotted}={rate} is a dropout rate and must lie in [0, 1) "
                        f"(0 = off); set --config.{dotted}=0.1 or another value in range")
  for dotted, least in LEAST_VALUES:
    value = _field(config, dotted)
    if value < least:
      raise ConfigError(f"{dotted}={value} must be >= {least}; set --config.{dotted} "
                        f"to {least} or more")


def _check_backbone(model) -> None:
  checkpoint = model.init_checkpoint
  if model.from_scratch and checkpoint:
    raise ConfigError(
        f"model.from_scratch=True but model.init_checkpoint={checkpoint!r} is set; drop "
        "one: --config.model.init_checkpoint='' to train from scratch, or "
        "--config.model.from_scratch=False to start from the checkpoint")
  if not checkpoint and not model.from_scratch:
    raise ConfigError(
        "model.init_checkpoint is empty: the backbone would be random (and frozen, for "
        "prompt and head-only methods); pass --config.model.init_checkpoint=PATH, or "
        "--config.model.from_scratch=True to train from a random init on purpose")
  if hub.is_hub_reference(checkpoint):
    hub.local_path(checkpoint)  # resolved (and cached) now: a missing file fails here
    return
  if checkpoint and not npz_lib.exists(checkpoint):
    raise ConfigError(
        f"Backbone checkpoint {checkpoint!r} does not exist. Download it (e.g. "
        "gs://vit_models/imagenet21k/ViT-B_16.npz) or pass a local path with "
        "--config.model.init_checkpoint=PATH (or --config.model.from_scratch=True with "
        "init_checkpoint='' to train from scratch).")


def _check_side_network(config, method) -> None:
  side_checkpoint = config.sidetune.checkpoint
  if side_checkpoint and method.name != "sidetune":
    raise ConfigError(
        f"sidetune.checkpoint={side_checkpoint!r} is only read by method 'sidetune', not "
        f"{config.method!r}; drop --config.sidetune.checkpoint or use --config.method=sidetune")
  if side_checkpoint and not npz_lib.exists(side_checkpoint):
    raise ConfigError(
        f"Side-network checkpoint {side_checkpoint!r} does not exist. Pass a file written "
        "by sidetune.save_side_network, or --config.sidetune.checkpoint='' to start the "
        "side network from its initialisation.")


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and proves it is writable, before any compute."""
  try:
    tf.io.gfile.makedirs(workdir)
    probe = os.path.join(workdir, f".write-probe-{os.getpid()}")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    raise ConfigError(f"workdir {workdir!r} is not writable ({e}); choose a directory "
                      "you can write to with --workdir") from e


def config_fields(config) -> dict:
  """Every field of a config by its dotted name: {"optim.batch_size": 128, ...}.

  ``config``: a ConfigDict, or the nested dict of its JSON (e.g. config.json).
  """
  tree = config if isinstance(config, dict) else json.loads(config.to_json_best_effort())
  return {path.replace("/", "."): value
          for path, value in trees.flatten(tree).items()}


def in_fields(field: str, prefixes) -> bool:
  """Whether the dotted ``field`` starts with one of ``prefixes`` ("eval." covers a section)."""
  return any(field.startswith(p) for p in prefixes)


def check_resume_config(workdir: str, config) -> None:
  """Refuses to resume a workdir whose checkpoint came from a different config."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = config_fields(config)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      previous = config_fields(json.load(f))
    differing = sorted(key for key in set(previous) | set(current)
                       if previous.get(key) != current.get(key)
                       and not in_fields(key, RESUME_NEUTRAL_FIELDS))
    has_checkpoint = tf.io.gfile.exists(os.path.join(workdir, "checkpoints"))
    if differing and has_checkpoint and not config.get("allow_config_change", False):
      details = "; ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}"
                          for k in differing)
      raise ConfigError(
          f"{workdir} holds a checkpoint from a different config ({details}). Use a new "
          "--workdir, or rerun with the original config.")
  if jax.process_index() == 0:
    with tf.io.gfile.GFile(path, "w") as f:
      f.write(config.to_json_best_effort(indent=2))

