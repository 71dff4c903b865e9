"""The config checks through the main job: every bad value is refused before the
data is decoded or the model built, with one line naming the field and the fix;
resuming a workdir whose checkpoint came from a different config is refused,
naming the fields that differ."""

import builtins
import os
import re

import pytest

import data_fixtures
from configs import vpt as vpt_config
import run_fixtures
from run_fixtures import tiny_config
from vpt_jax import errors
from vpt_jax.training import config_checks
from vpt_jax.training import trainer

# backbone and data_dir: fixtures of conftest.py.


no_model_init = run_fixtures.no_model_init
no_compute = run_fixtures.no_compute


def _assert_refused(config, workdir, fragment):
  with pytest.raises(config_checks.ConfigError) as error:
    trainer.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert isinstance(error.value, errors.UserError)
  assert fragment in message, message
  assert "\n" not in message  # one line on the command line
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


# (overrides, the fragment of the message: the problem and the fix)
REFUSED_VALUES = {
    "negative_lr": ({"optim.base_lr": -0.1},
                    "optim.base_lr=-0.1 must be positive (a learning rate below 0 climbs the "
                    "loss); set --config.optim.base_lr to a value above 0"),
    "zero_lr": ({"optim.base_lr": 0.0}, "optim.base_lr=0.0 must be positive"),
    "negative_weight_decay": ({"optim.weight_decay": -1e-4},
                              "optim.weight_decay=-0.0001 must be >= 0 (0 = no decay); set "
                              "--config.optim.weight_decay to 0 or above"),
    "momentum_one": ({"optim.momentum": 1.0},
                     "optim.momentum=1.0 must lie in [0, 1); set --config.optim.momentum"),
    "zero_batch_size": ({"optim.batch_size": 0},
                        "optim.batch_size=0 must be positive; set --config.optim.batch_size "
                        "to a value above 0"),
    "zero_epochs": ({"optim.epochs": 0, "optim.warmup_epochs": 0},
                    "optim.epochs=0 must be positive; set --config.optim.epochs to a value "
                    "above 0"),
    "warmup_beyond_epochs": ({"optim.epochs": 3, "optim.warmup_epochs": 10},
                             "optim.warmup_epochs=10 must lie in [0, optim.epochs=3]; set "
                             "--config.optim.warmup_epochs=0.3 (a tenth of the epochs"),
    "prompt_dropout_one": ({"prompt.dropout": 1.0},
                           "prompt.dropout=1.0 is a dropout rate and must lie in [0, 1) "
                           "(0 = off); set --config.prompt.dropout=0.1"),
    "negative_prompt_dropout": ({"prompt.dropout": -0.1}, "prompt.dropout=-0.1 is a dropout"),
    "model_dropout": ({"model.dropout_rate": 1.5},
                      "model.dropout_rate=1.5 is a dropout rate and must lie in [0, 1)"),
    "cvpt_drop_path": ({"cvpt.drop_path": 1.0}, "cvpt.drop_path=1.0 is a dropout rate"),
    "e2vpt_kv_dropout": ({"e2vpt.kv_dropout": -0.5}, "e2vpt.kv_dropout=-0.5 is a dropout rate"),
    "mlp_dropout": ({"mlp.dropout": 1.0}, "mlp.dropout=1.0 is a dropout rate"),
    "keep_zero": ({"checkpoint.keep": 0},
                  "checkpoint.keep=0 must be >= 1; set --config.checkpoint.keep to 1 or more"),
    "negative_every_steps": ({"checkpoint.every_steps": -1},
                             "checkpoint.every_steps=-1 must be >= 0; set "
                             "--config.checkpoint.every_steps to 0 or more"),
    "zero_eval_batch": ({"eval.batch_size": 0},
                        "eval.batch_size=0 must be >= 1; set --config.eval.batch_size to 1"),
    "negative_eval_every": ({"eval.every_epochs": -1},
                            "eval.every_epochs=-1 must be >= 0; set --config.eval.every_epochs"),
    "zero_log_every": ({"log_every_steps": 0},
                       "log_every_steps=0 must be >= 1; set --config.log_every_steps to 1"),
    "one_class_configured": ({"data.num_classes": 1},
                             "data.num_classes=1: a classifier needs at least 2 classes; set "
                             "--config.data.num_classes=0 to take them from the dataset"),
    "vpt_without_backbone": ({"model.init_checkpoint": ""},
                             "model.init_checkpoint is empty: the backbone would be random "
                             "(and frozen, for prompt and head-only methods); pass "
                             "--config.model.init_checkpoint=PATH, or "
                             "--config.model.from_scratch=True"),
    "full_without_backbone": ({"method": "full", "model.init_checkpoint": ""},
                              "pass --config.model.init_checkpoint=PATH, or "
                              "--config.model.from_scratch=True"),
    "trainable_rule_label": ({"trainable_rules": ((".*", "trainable"),)},
                             "Bad trainable rule ('.*', 'trainable'): expected (regex, label) "
                             "with label in"),
    "trainable_rule_regex": ({"trainable_rules": (("head/(", "train"),)},
                             "Bad regex 'head/(' in trainable rules"),
    "scratch_with_backbone": ({"model.from_scratch": True},
                              "model.from_scratch=True but model.init_checkpoint="),
    "export_format": ({"export.format": "onnx"},
                      "unknown export.format 'onnx'; choose one of npz, stablehlo, saved_model"),
    "export_batch_size": ({"export.format": "stablehlo", "export.batch_size": -1},
                          "export.batch_size=-1: use 0 for any batch size (symbolic) or a fixed"),
    "export_platforms": ({"export.format": "saved_model", "export.platforms": "gpu"},
                         "export.platforms='gpu': give a comma-separated subset of cpu, cuda"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_VALUES))
def test_bad_values_are_refused_before_compute(backbone, data_dir, tmp_path, no_compute,
                                               case):
  overrides, fragment = REFUSED_VALUES[case]
  _assert_refused(tiny_config(backbone, data_dir, **overrides), str(tmp_path / "run"),
                  fragment)


def test_hub_reference_is_resolved_before_compute(backbone, data_dir, tmp_path, no_compute,
                                                 monkeypatch):
  """An hf:// checkpoint is resolved at the config check (here: the package is missing)."""
  real_import = builtins.__import__

  def no_hub(name, *args, **kwargs):
    if name.startswith("huggingface_hub"):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_hub)
  config = tiny_config(backbone, data_dir, **{"model.init_checkpoint": "hf://timm/vit_tiny"})
  with pytest.raises(errors.UserError, match="pip install huggingface_hub") as error:
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert "\n" not in str(error.value)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


# Found from the splits' sizes and the classes' metadata; vpt_sprites/tiny has
# 10 test images.
REFUSED_SPLITS = {
    "empty_test_split": ({"data.test_split": "test[10:]"},
                         "data.test_split='test[10:]' selects no examples of vpt_sprites/tiny; "
                         "fix --config.data.test_split"),
    "unknown_label_key": ({"data.label_key": "cnt"},
                          "'vpt_sprites/tiny' has no feature 'cnt'; its features are"),
    "inverted_slice": ({"data.eval_split": "test[5:3]"},
                       "data.eval_split='test[5:3]' selects no examples of vpt_sprites/tiny"),
    "unknown_eval_split": ({"data.eval_split": "valdation"},
                           "data.eval_split='valdation' is not a split of vpt_sprites/tiny ("),
    "empty_train_split": ({"data.train_split": ""},
                          "data.train_split is empty; name the training split "
                          "(--config.data.train_split=train)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_SPLITS))
def test_splits_that_select_nothing_are_refused_before_compute(backbone, data_dir, tmp_path,
                                                               no_compute, case):
  overrides, fragment = REFUSED_SPLITS[case]
  _assert_refused(tiny_config(backbone, data_dir, **overrides), str(tmp_path / "run"),
                  fragment)


def test_a_one_class_dataset_is_refused_before_compute(backbone, tmp_path, no_compute):
  for i in range(2):
    data_fixtures.write_image(str(tmp_path / "images" / "cats" / f"{i}.png"), 40 * i)
  config = tiny_config(backbone, "", **{
      "data.task": "folder", "data.path": str(tmp_path / "images"),
      "data.train_split": "all", "data.eval_split": "", "data.test_split": "all"})
  _assert_refused(config, str(tmp_path / "run"),
                  "folder (label 'count') has 1 class(es); a classifier needs at least 2")


def test_num_prompts_zero_is_refused_and_only_an_absent_count_takes_the_default():
  assert vpt_config.get_config("builder=dmlab").prompt.num_prompts == 50
  assert vpt_config.get_config("builder=dmlab,num_prompts=7").prompt.num_prompts == 7
  config = vpt_config.get_config("builder=dmlab,num_prompts=0,checkpoint=")
  assert config.prompt.num_prompts == 0
  config.model.from_scratch = True
  with pytest.raises(ValueError, match=re.escape("vpt_deep needs prompt.num_prompts >= 1, got 0")):
    config_checks.validate_config(config)


def test_training_from_scratch_must_be_asked_for(backbone, data_dir):
  config = tiny_config(backbone, data_dir, **{"model.init_checkpoint": "",
                                              "model.from_scratch": True})
  config_checks.validate_config(config)  # asked for: no refusal


def test_resuming_with_a_different_config_is_refused(backbone, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(
      tiny_config(backbone, data_dir, **{"optim.epochs": 1, "optim.warmup_epochs": 0}),
      workdir)
  with pytest.raises(config_checks.ConfigError, match=r"optim.base_lr: 2.0 -> 0.5"):
    trainer.train_and_evaluate(
        tiny_config(backbone, data_dir, **{"optim.epochs": 1, "optim.warmup_epochs": 0,
                                           "optim.base_lr": 0.5}), workdir)


def test_the_export_trace_runs_once_per_model_and_settings(backbone, data_dir, monkeypatch):
  """A sweep's settings (same model, other optimizer values) share one export trace."""
  traced = []
  real = config_checks.stablehlo_export.check_exportable
  monkeypatch.setattr(config_checks.stablehlo_export, "check_exportable",
                      lambda *args: traced.append(args[2]) or real(*args))
  monkeypatch.setattr(config_checks, "_EXPORTABLE", set())
  for overrides in ({}, {"optim.base_lr": 0.5}, {"export.batch_size": 4}):
    config_checks.validate_config(tiny_config(backbone, data_dir, **{
        "export.format": "stablehlo", "export.platforms": "cpu", **overrides}))
  assert traced == [0, 4]  # the second config differs only in its learning rate
