"""From config.data to a source: what the configs name and what check_data_config refuses."""

import pytest

from configs import common
from vpt_jax import errors
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


def _folder_config(path, **splits):
  config = common.base_config()
  config.data.task, config.data.path = "folder", str(path)
  for field, split in splits.items():
    config.data[field] = split
  return config.data


def _class_folders(root, *classes):
  for name in classes:
    (root / name).mkdir(parents=True)
    (root / name / "0.png").write_bytes(b"")  # only the layout is read


def test_the_default_splits_are_the_base_configs():
  data = common.base_config().data
  assert {field: data[field] for field in sources.SPLIT_FIELDS} == sources.DEFAULT_SPLITS


@pytest.mark.parametrize("folders, expected", [
    # A flat class folder: a fixed 80/20 share of its hashed order.
    (["cat", "dog"], {"train_split": "all[:80%]", "eval_split": "", "test_split": "all[80%:]"}),
    (["train/cat", "train/dog", "val/cat", "test/dog"],
     {"train_split": "train", "eval_split": "val", "test_split": "test"}),
    (["train/cat", "validation/dog"],
     {"train_split": "train", "eval_split": "validation", "test_split": ""}),
])
def test_a_class_folder_with_the_default_splits_takes_them_from_its_layout(tmp_path, folders,
                                                                           expected):
  _class_folders(tmp_path, *folders)
  data = _folder_config(tmp_path)
  said = sources.derive_folder_splits(data)
  assert {field: data[field] for field in sources.SPLIT_FIELDS} == expected
  assert said.startswith("data splits from the folder layout: ") and all(
      f"{field}={split!r}" in said for field, split in expected.items())


def test_splits_the_user_set_are_kept(tmp_path):
  _class_folders(tmp_path, "cat", "dog")
  data = _folder_config(tmp_path, train_split="all[:50%]")
  assert sources.derive_folder_splits(data) is None
  assert (data.train_split, data.test_split) == ("all[:50%]", "test")


@pytest.mark.parametrize("task, builder", [("", "mnist"), ("list", "")])
def test_missing_data_is_refused_as_missing_not_as_a_bad_split(tmp_path, task, builder):
  # An unprepared TFDS dataset, and a list folder without its split lists: the
  # fix is to prepare or point at the data, not to change data.train_split.
  config = common.base_config()
  config.data.task, config.data.builder = task, builder
  config.data.data_dir = config.data.path = str(tmp_path)
  config.data.num_classes = 3
  with pytest.raises(errors.MissingInputError) as raised:
    sources.check_data_splits(config.data)
  assert "fix --config.data.train_split" not in str(raised.value)
