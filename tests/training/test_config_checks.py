"""The config checks through the main job: resuming a workdir whose checkpoint
came from a different config is refused, naming the fields that differ; a keep
policy that keeps no checkpoint is refused."""

import pytest

from run_fixtures import tiny_config
from vpt_jax.training import config_checks
from vpt_jax.training import trainer

# backbone and data_dir: fixtures of conftest.py.


def test_resuming_with_a_different_config_is_refused(backbone, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(
      tiny_config(backbone, data_dir, **{"optim.epochs": 1, "optim.warmup_epochs": 0}),
      workdir)
  with pytest.raises(config_checks.ConfigError, match=r"optim.base_lr: 2.0 -> 0.5"):
    trainer.train_and_evaluate(
        tiny_config(backbone, data_dir, **{"optim.epochs": 1, "optim.warmup_epochs": 0,
                                           "optim.base_lr": 0.5}), workdir)


def test_keeping_no_checkpoint_is_refused(backbone, data_dir):
  """orbax's max_to_keep=0 would delete every save, the newest finite one included."""
  with pytest.raises(config_checks.ConfigError, match=r"checkpoint.keep must be >= 1.*got 0"):
    config_checks.validate_config(tiny_config(backbone, data_dir, **{"checkpoint.keep": 0}))
