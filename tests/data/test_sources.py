"""From config.data to a source: what the configs name and what check_data_config refuses."""

import pytest

from configs import common
from vpt_jax.data import sources


def test_nabirds_needs_its_split_files():
  config = common.base_config()
  config.data.task = "fgvc/nabirds"
  assert "no TFDS builder" in sources.check_data_config(config.data)


def test_task_configs_validate():
  from configs import fgvc as fgvc_config  # pylint: disable=g-import-not-at-top
  from configs import vtab as vtab_config  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import config_checks  # pylint: disable=g-import-not-at-top
  dmlab = vtab_config.get_config("task=dmlab,checkpoint=")
  dmlab.model.from_scratch = True
  config_checks.validate_config(dmlab)
  assert (dmlab.data.task, dmlab.data.train_split, dmlab.prompt.num_prompts,
          dmlab.optim.batch_size, dmlab.optim.base_lr) == (
              "vtab/dmlab", "train800val200", 100, 64, 1.0)
  assert vtab_config.get_config("task=clevr_dist,num_prompts=7").prompt.num_prompts == 7
  cars = fgvc_config.get_config("dataset=cars,checkpoint=")
  cars.model.from_scratch = True
  config_checks.validate_config(cars)
  assert cars.data.task == "fgvc/stanford_cars" and cars.data.preprocess == "resize_crop_flip"
  bad = vtab_config.get_config("task=dmlab,checkpoint=")
  bad.model.from_scratch = True
  bad.data.preprocess = "crop"
  with pytest.raises(config_checks.ConfigError, match="resize_crop_flip"):
    config_checks.validate_config(bad)
