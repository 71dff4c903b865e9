"""Few-shot splits: NOAH's list files (tiny lists in its layout) and the TFDS draw
(on the local vpt_digits builder, through the real TFDS path)."""

import collections
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_fixtures
from vpt_jax import errors
from vpt_jax.data import few_shot
from vpt_jax.data import source_protocols
from vpt_jax.data import sources
from vpt_jax.data import training_stream


def _reference_draw(labels, shots, seed):
  """The documented rule, written as a loop: walk the seeded permutation and keep an
  example while its class has fewer than ``shots``."""
  taken = collections.Counter()
  kept = []
  for position in np.random.default_rng(seed).permutation(len(labels)):
    if taken[labels[position]] < shots:
      taken[labels[position]] += 1
      kept.append(position)
  return sorted(kept)


def test_draw_follows_the_rule_counts_reproduces_and_nests():
  labels = np.random.default_rng(7).integers(0, 5, size=200)
  for shots in few_shot.SHOTS:
    for seed in few_shot.SEEDS:
      drawn = few_shot.draw_positions(labels, shots, seed)
      assert drawn.tolist() == _reference_draw(labels, shots, seed)
      assert np.bincount(labels[drawn], minlength=5).tolist() == [shots] * 5
      assert drawn.tolist() == few_shot.draw_positions(labels, shots, seed).tolist()
  assert (few_shot.draw_positions(labels, 4, 0).tolist()
          != few_shot.draw_positions(labels, 4, 1).tolist())
  for small, large in zip(few_shot.SHOTS, few_shot.SHOTS[1:]):  # nested per seed
    assert set(few_shot.draw_positions(labels, small, 2)) <= set(
        few_shot.draw_positions(labels, large, 2))


def test_a_class_with_too_few_images_is_refused():
  labels = np.array([0] * 16 + [1] * 3 + [2] * 20)
  few_shot.check_counts(labels, 3, 2, "pool")
  with pytest.raises(errors.UserError, match="class 1 has 3 image.*data.shots=4.*fewer shots"):
    few_shot.check_counts(labels, 3, 4, "pool")
  with pytest.raises(errors.UserError, match="class 2 has 0"):
    few_shot.check_counts(labels[:19], 3, 1, "pool")


@pytest.mark.parametrize("shots,seed,problem", [(3, 0, "not one of NOAH's shot counts"),
                                                (0, 0, "not one of"), (4, -1, ">= 0")])
def test_bad_shot_choices_are_refused_before_reading(shots, seed, problem):
  data = data_fixtures.data_config(task="fewshot/oxford_pets", shots=shots, shots_seed=seed)
  assert problem in sources.check_data_config(data)
  with pytest.raises(errors.UserError, match=problem):
    few_shot.make_source("oxford_pets", "train", shots=shots, seed=seed, path="/nowhere")


def test_config_checks_name_the_fix():
  data = data_fixtures.data_config(task="fewshot/aircraft", shots=4)
  assert "--config.data.path" in sources.check_data_config(data)
  data = data_fixtures.data_config(task="fewshot/petz", shots=4)
  assert "did you mean" in sources.check_data_config(data)
  assert sources.check_data_config(
      data_fixtures.data_config(task="fewshot/pets", shots=16, shots_seed=2)) is None


# ------------------------------------------------------------------- NOAH's lists

def _noah_folder(root, dataset, train_rows, test_rows, image_dir="images", test_dir=None,
                 test_list="test_meta.list", shots=2, seed=1):
  """A dataset folder in NOAH's layout: annotations/ lists + PNGs below image_dir."""
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  for name, rows, folder in ((f"train_meta.list.num_shot_{shots}.seed_{seed}", train_rows,
                              image_dir), (test_list, test_rows, test_dir or image_dir)):
    with open(os.path.join(root, "annotations", name), "w") as f:
      f.writelines(f"{path} {label}\n" for path, label, _ in rows)
    for path, _, value in rows:
      data_fixtures.write_image(os.path.join(root, folder, path), value)
  return root


def test_noah_lists_are_read_as_noah_reads_them(tmp_path):
  train = [("apple_pie/1.jpg", 0, 10), ("apple_pie/2.jpg", 0, 20),
           ("baby back ribs/3.jpg", 1, 30), ("baby back ribs/4.jpg", 1, 40),
           ("baby back ribs/4.jpg", 1, 40)]  # a repeated line stays (NOAH's Pets lists)
  test = [("waffles/9.jpg", 100, 90)]
  root = _noah_folder(str(tmp_path / "food101"), "food101", train, test)
  source = few_shot.make_source("food101", "train", shots=2, seed=1, path=root)
  assert source_protocols.num_examples(source) == 5
  assert source_protocols.num_classes(source) == 101
  images, labels = training_stream.load_split_arrays(source, image_size=4)
  assert labels.tolist() == [0, 0, 1, 1, 1]
  assert images[:, 3, 3, 0].tolist() == [10, 20, 30, 40, 40]  # far from the marked pixel
  assert source.paths[2] == os.path.join(root, "images", "baby back ribs/3.jpg")
  test_source = sources.make_source(data_fixtures.data_config(
      task="fewshot/food101", shots=2, shots_seed=1, path=root), "test")
  assert test_source.labels.tolist() == [100]


def test_noah_image_folders_of_cars_and_imagenet(tmp_path):
  cars = _noah_folder(str(tmp_path / "cars"), "stanford_cars",
                      [("cars_train/1.jpg", 5, 1)], [("cars_test/2.jpg", 7, 2)], image_dir="",
                      shots=1, seed=0)
  source = few_shot.make_source("stanford_cars", "train", shots=1, seed=0, path=cars)
  assert source.paths.tolist() == [os.path.join(cars, "cars_train/1.jpg")]
  imagenet = _noah_folder(str(tmp_path / "imagenet"), "imagenet",
                          [("n01/a.JPEG", 0, 3)], [("ILSVRC2012_val_1.JPEG", 999, 4)],
                          image_dir="train", test_dir="val", test_list="val_meta.list",
                          shots=16, seed=2)
  test = few_shot.make_source("imagenet", "test", shots=16, seed=2, path=imagenet)
  assert test.paths.tolist() == [os.path.join(imagenet, "val", "ILSVRC2012_val_1.JPEG")]
  assert test.labels.tolist() == [999]


def test_bad_noah_lists_are_one_line_errors_naming_file_and_line(tmp_path):
  root = _noah_folder(str(tmp_path / "pets"), "oxford_pets", [("Abyssinian_1.jpg", 0, 1)],
                      [("Abyssinian_2.jpg", 0, 2)], shots=4, seed=0)
  list_path = os.path.join(root, "annotations", "train_meta.list.num_shot_4.seed_0")
  with open(list_path, "a") as f:
    f.write("Bengal_3.jpg five\n")
  with pytest.raises(errors.UserError) as error:
    few_shot.make_source("oxford_pets", "train", shots=4, seed=0, path=root)
  assert f"{list_path}:2:" in str(error.value) and "\n" not in str(error.value)
  with pytest.raises(errors.MissingInputError, match=r"num_shot_8\.seed_0 is missing.*"
                     r"data/few-shot/oxford-pets/annotations/"):
    few_shot.make_source("oxford_pets", "train", shots=8, seed=0, path=root)
  with open(list_path, "w") as f:
    f.write("Abyssinian_1.jpg 37\n")
  with pytest.raises(errors.UserError, match=r"label 37 .* outside \[0, 37\)"):
    few_shot.make_source("oxford_pets", "train", shots=4, seed=0, path=root)


# ------------------------------------------------------------ the TFDS draw, for real

DIGITS = few_shot.FewShotDataset("digits", "Digits", 10, "", {}, {}, "vpt_digits:1.0.0")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return data_fixtures.prepared_tfds_dir(tmp_path_factory, names=("vpt_digits",))


def _all(data_dir, split):
  return list(tfds.as_numpy(tfds.builder("vpt_digits", data_dir=data_dir).as_dataset(
      split=split, shuffle_files=False)))


def test_tfds_draw_reads_the_drawn_pool_examples(digits_dir):
  pool = _all(digits_dir, "train")
  labels = np.array([e["label"] for e in pool])
  source = few_shot.tfds_source(DIGITS, "train", 4, 1, digits_dir)
  assert source_protocols.num_examples(source) == 40
  images, got_labels = training_stream.load_split_arrays(source, image_size=8)
  expected = _reference_draw(labels, 4, 1)
  assert got_labels.tolist() == labels[expected].tolist()
  assert np.bincount(got_labels, minlength=10).tolist() == [4] * 10
  np.testing.assert_array_equal(images, np.stack([pool[i]["image"] for i in expected]))
  again, _ = training_stream.load_split_arrays(
      few_shot.tfds_source(DIGITS, "train", 4, 1, digits_dir), image_size=8)
  np.testing.assert_array_equal(images, again)
  # Two processes read disjoint shares that together are the draw.
  shares = [source.examples(i, 2) for i in range(2)]
  counts = [sum(1 for _ in tfds.as_numpy(s)) for s in shares]
  assert counts == [20, 20]


def test_tfds_draw_is_disjoint_from_the_test_split(digits_dir):
  test = few_shot.tfds_source(DIGITS, "test", 16, 0, digits_dir)
  assert isinstance(test, source_protocols.ImageSource) and test.split == "test"
  shots = few_shot.tfds_source(DIGITS, "train", 16, 0, digits_dir)
  shot_images, _ = training_stream.load_split_arrays(shots, image_size=8)
  test_images, _ = training_stream.load_split_arrays(test, image_size=8)
  shot_digests = {data_fixtures.digest(image) for image in shot_images}
  test_digests = {data_fixtures.digest(image) for image in test_images}
  pool_digests = {data_fixtures.digest(e["image"]) for e in _all(digits_dir, "train")}
  assert shot_digests <= pool_digests
  assert not shot_digests & test_digests  # (the digits' train and test share no image)
  with pytest.raises(errors.UserError, match="NOAH's val list needs --config.data.path"):
    few_shot.tfds_source(DIGITS, "val", 16, 0, digits_dir)


def test_aircraft_without_lists_names_the_fix():
  with pytest.raises(errors.UserError, match="no TFDS builder.*--config.data.path"):
    few_shot.make_source("fgvc_aircraft", "train", shots=1, seed=0)


def test_fingerprint_names_the_drawn_pool_examples(digits_dir):
  from vpt_jax.data import fingerprints  # pylint: disable=g-import-not-at-top
  source = few_shot.tfds_source(DIGITS, "train", 1, 0, digits_dir)
  kind, ids = fingerprints.example_ids(source)
  pool_ids = fingerprints.example_ids(source_protocols.ImageSource("vpt_digits:1.0.0", "train",
                                                                   digits_dir))[1]
  assert kind == "tfds" and ids == [pool_ids[i] for i in _reference_draw(
      np.array([e["label"] for e in _all(digits_dir, "train")]), 1, 0)]
  assert fingerprints.fingerprint(source, image_size=8)["classes"] == [1] * 10


def test_a_joined_pool_draws_across_its_parts(digits_dir):
  """Oxford Flowers draws from train+validation; here the digits' train+test."""
  joined = few_shot.FewShotDataset("d", "D", 10, "", {}, {}, "vpt_digits:1.0.0",
                                   tfds_pool="train+test")
  pool = _all(digits_dir, "train") + _all(digits_dir, "test")
  labels = np.array([e["label"] for e in pool])
  source = few_shot.tfds_source(joined, "train", 16, 0, digits_dir)
  expected = _reference_draw(labels, 16, 0)
  assert max(expected) >= 1000  # some come from the second part
  images, got = training_stream.load_split_arrays(source, image_size=8)
  assert got.tolist() == labels[expected].tolist()
  np.testing.assert_array_equal(images, np.stack([pool[i]["image"] for i in expected]))
