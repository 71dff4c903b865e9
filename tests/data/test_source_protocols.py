"""Reading a source's size, classes and prepared TFDS builder, from metadata only."""

import pytest

import data_fixtures
from vpt_jax.data import source_protocols


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return data_fixtures.prepared_tfds_dir(tmp_path_factory, ("vpt_sprites/tiny", "vpt_digits"))


def test_num_classes_and_examples_from_metadata(data_dir):
  count = source_protocols.ImageSource("vpt_sprites/tiny", "train[:10]+validation", data_dir,
                                       label_key="count")
  assert source_protocols.num_classes(count) == 3
  assert source_protocols.num_examples(count) == 18
  digits = source_protocols.ImageSource("vpt_digits", "test", data_dir)
  assert source_protocols.num_classes(digits) == 10
  assert source_protocols.num_examples(digits) == 797


def test_unknown_label_key_names_the_features(data_dir):
  source = source_protocols.ImageSource("vpt_digits", "test", data_dir, label_key="digit")
  with pytest.raises(KeyError, match="label"):
    source_protocols.num_classes(source)


def test_unprepared_remote_dataset_error_names_the_fix(tmp_path):
  source = source_protocols.ImageSource("mnist", "train", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not prepared"):
    source_protocols.num_examples(source)
