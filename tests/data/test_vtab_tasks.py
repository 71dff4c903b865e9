"""The VTAB-1k task table: groups, classes, builders and split strings."""

import pytest
import tensorflow_datasets as tfds

from vpt_jax.data import vtab_tasks

NATURAL = ["cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn",
           "sun397"]
SPECIALIZED = ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]
STRUCTURED = ["clevr_count", "clevr_dist", "dmlab", "kitti_dist", "dsprites_loc",
              "dsprites_ori", "smallnorb_azim", "smallnorb_elev"]

def test_nineteen_tasks_in_three_groups():
  assert [t.name for t in vtab_tasks.TASKS.values() if t.group == "natural"] == NATURAL
  assert [t.name for t in vtab_tasks.TASKS.values() if t.group == "specialized"] == SPECIALIZED
  assert [t.name for t in vtab_tasks.TASKS.values() if t.group == "structured"] == STRUCTURED
  assert vtab_tasks.task_names("all") == NATURAL + SPECIALIZED + STRUCTURED
  assert vtab_tasks.task_names("structured+dmlab+cifar") == STRUCTURED + ["cifar100"]
  classes = {t.name: t.num_classes for t in vtab_tasks.TASKS.values()}
  assert classes == {
      "cifar100": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102,
      "oxford_iiit_pet": 37, "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10,
      "resisc45": 45, "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6,
      "dmlab": 6, "kitti_dist": 4, "dsprites_loc": 16, "dsprites_ori": 16,
      "smallnorb_azim": 18, "smallnorb_elev": 9}
  assert {t.name for t in vtab_tasks.TASKS.values() if t.manual_download} == {
      "resisc45", "diabetic_retinopathy"}


def test_unknown_task_names_the_close_ones():
  with pytest.raises(ValueError, match="clevr_count"):
    vtab_tasks.get_task("clevr_cnt")
  assert vtab_tasks.get_task("smallnorb_azi").name == "smallnorb_azim"  # NOAH's folder name


def test_builders_are_the_ones_tfds_4_9_10_can_build(tmp_path):
  for task in vtab_tasks.TASKS.values():
    name, _, version = task.builder.partition(":")
    # Only the canonical version can be generated (vtab.md 5).
    assert str(tfds.builder(name, data_dir=str(tmp_path)).version) == version, task.name
  assert vtab_tasks.get_task("kitti").builder == "kitti:3.3.0"
  assert vtab_tasks.get_task("kitti").reference_builder == "kitti:3.1.0"
  assert vtab_tasks.get_task("pets").builder == "oxford_iiit_pet:4.0.0"


@pytest.mark.parametrize("name", list(vtab_tasks.TASKS))
def test_literal_splits_equal_the_reference_rule(name):
  task = vtab_tasks.TASKS[name]
  assert vtab_tasks.compute_splits(task, task.reference_sizes) == dict(task.splits)
  assert task.splits["train800"] == "train[:800]"
  assert task.splits["train800val200"] == "train[:800]+" + task.splits["val200"]
  # The test split's size follows from the same sizes.
  sizes = {k: tfds.core.SplitInfo(name=k, shard_lengths=[v], num_bytes=0,
                                  filename_template=None)
           for k, v in task.reference_sizes.items()}
  instructions = tfds.core.ReadInstruction.from_spec(task.splits["test"]).to_absolute(sizes)
  assert sum(i.to - i.from_ if i.to else sizes[i.splitname].num_examples - (i.from_ or 0)
             for i in instructions) == task.test_size
  assert sum(1 for i in tfds.core.ReadInstruction.from_spec(
      task.splits["val200"]).to_absolute(sizes)) == 1


def test_boundaries_move_with_the_split_sizes_as_in_the_reference():
  caltech = vtab_tasks.compute_splits(vtab_tasks.get_task("caltech101"), {"train": 1000})
  assert caltech["val200"] == "train[900:1100]"
  eurosat = vtab_tasks.compute_splits(vtab_tasks.get_task("eurosat"), {"train": 1001})
  # 60 * 1001 // 100 = 600, 20 * 1001 // 100 = 200.
  assert eurosat["val200"] == "train[600:800]" and eurosat["test"] == "train[800:]"
  dsprites = vtab_tasks.compute_splits(vtab_tasks.get_task("dsprites_ori"), {"train": 1000})
  assert dsprites["val200"] == "train[800:1000]" and dsprites["test"] == "train[900:]"
  norb = vtab_tasks.compute_splits(vtab_tasks.get_task("smallnorb_elev"), {"train": 5, "test": 8})
  assert norb == {"train800": "train[:800]", "val200": "test[:200]",
                  "train800val200": "train[:800]+test[:200]", "test": "test[50%:]"}
