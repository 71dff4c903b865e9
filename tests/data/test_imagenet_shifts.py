"""ImageNet's shifted test sets: the 200-class restriction of -A and -R against
hand-computed examples, and the TFDS labels (1000-class) on mock data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_fixtures
from vpt_jax import errors
from vpt_jax.data import imagenet_shifts
from vpt_jax.data import source_protocols


def test_subsets_have_200_ascending_imagenet_classes():
  for classes in (imagenet_shifts.IMAGENET_A_CLASSES, imagenet_shifts.IMAGENET_R_CLASSES):
    assert len(classes) == 200 == len(set(classes))
    assert list(classes) == sorted(classes) and 0 <= classes[0] and classes[-1] < 1000
  # Spot values from Hendrycks' lists (A: n01498041 stingray = 6; R: goldfish = 1).
  assert imagenet_shifts.IMAGENET_A_CLASSES[:3] == (6, 11, 13)
  assert imagenet_shifts.IMAGENET_R_CLASSES[:3] == (1, 2, 4)
  assert imagenet_shifts.TARGETS["imagenet_a"].classes is imagenet_shifts.IMAGENET_A_CLASSES
  assert imagenet_shifts.TARGETS["imagenet_v2"].classes is None


def test_restricted_top1_by_hand():
  classes = (2, 5, 7)
  logits = np.full((4, 10), -1.0)
  logits[0, [0, 2, 5]] = [9.0, 1.0, 0.5]   # overall argmax 0 (outside); among {2,5,7}: 2
  logits[1, [5, 7, 9]] = [3.0, 2.0, 8.0]   # overall 9; among the subset 5
  logits[2, [2, 7]] = [0.1, 0.2]           # 7
  logits[3, [3, 5]] = [5.0, 4.0]           # overall 3; subset 5
  labels = np.array([2, 7, 7, 5])
  np.testing.assert_array_equal(imagenet_shifts.subset_predictions(logits, classes),
                                [2, 5, 7, 5])
  assert imagenet_shifts.subset_top1(logits, labels, classes) == 0.75  # rows 0, 2, 3
  assert imagenet_shifts.full_top1(logits, labels) == 0.25  # only row 2 (NOAH's way)
  assert imagenet_shifts.subset_top1(logits, labels, None) == 0.25
  with pytest.raises(errors.UserError, match="label 3 is not one of the subset's 3"):
    imagenet_shifts.subset_top1(logits, np.array([2, 7, 7, 3]), classes)


def test_restriction_equals_osu_projection():
  """OSU: logits[:, boolean mask] against label -> its position in the sorted subset."""
  rng = np.random.default_rng(0)
  classes = imagenet_shifts.IMAGENET_R_CLASSES
  logits = rng.normal(size=(64, 1000))
  labels = rng.choice(classes, size=64)
  mask = np.isin(np.arange(1000), classes)
  projected = np.array([list(classes).index(label) for label in labels])
  expected = np.mean(np.argmax(logits[:, mask], axis=1) == projected)
  assert imagenet_shifts.subset_top1(logits, labels, classes) == expected


def test_parse_targets():
  assert [t.name for t in imagenet_shifts.parse_targets("all")] == [
      "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
  assert [t.name for t in imagenet_shifts.parse_targets("imagenet_r+imagenet_a")] == [
      "imagenet_r", "imagenet_a"]
  with pytest.raises(errors.UserError, match="Unknown shifted test set 'imagenet_c'"):
    imagenet_shifts.parse_targets("imagenet_c")


@pytest.mark.parametrize("name", list(imagenet_shifts.TARGETS))
def test_tfds_builders_label_with_the_1000_imagenet_classes(name, tmp_path):
  target = imagenet_shifts.TARGETS[name]
  data_dir = str(tmp_path)
  data_fixtures.inject_split_sizes(data_dir, target.tfds_builder, {"test": 3})
  with tfds.testing.mock_data(num_examples=3, data_dir=data_dir):
    source = imagenet_shifts.target_source(target, data_dir)
    assert source_protocols.num_classes(source) == 1000
    assert source_protocols.num_examples(source) == 3
    names = tfds.builder(target.tfds_builder, data_dir=data_dir).info.features["label"].names
    assert names[1] == "n01443537"  # goldfish: ImageNet's synset order
