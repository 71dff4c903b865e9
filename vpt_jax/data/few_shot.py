"""Few-shot splits as NOAH defines them: N images per class, drawn with a seed.

NOAH (ZhangYuanhan-AI/NOAH, ``lib/datasets.py`` ``general_dataset_few_shot``)
trains on five FGVC datasets (and ImageNet, for domain generalisation) with 1,
2, 4, 8 or 16 images per class, three draws (seeds 0, 1, 2) each, and tests on
a fixed list. ``config.data.task = "fewshot/<dataset>"`` reads them, with
``data.shots`` = N and ``data.shots_seed`` = the draw, in one of two ways:

* NOAH's list files (``data.path`` set; NOAH's images come from CoOp's
  DATASETS.md). ``data.path`` is the dataset folder, holding
  ``annotations/train_meta.list.num_shot_<N>.seed_<S>``,
  ``annotations/val_meta.list`` and ``annotations/test_meta.list``
  (ImageNet: its test list is ``val_meta.list``, its val list
  ``unofficial_val_list_4_shot16seed0``). Each line is "relative/path label"
  (split at the last space: Food-101 and ImageNet-A paths hold spaces);
  paths start below ``images/`` (Stanford Cars: the folder itself; ImageNet:
  ``train/`` for the shots, ``val/`` for the test list). The lists are read as
  NOAH reads them, duplicates included (NOAH's Oxford-Pets lists hold every
  shot twice).
* TFDS (no ``data.path``; not for FGVC-Aircraft, which TFDS does not have).
  The shots come from the dataset's pool split (``tfds_pool``) by this rule:
  take ``numpy.random.default_rng(seed).permutation(len(pool))`` of the pool's
  stored positions (its files read one after another, in TFDS's order) and
  keep, per class, the first N positions in that order.
  So one seed gives one draw on every machine; for one seed the N-shot set is
  contained in the M-shot set for N < M (nested draws); the test split
  (``tfds_test``) is another TFDS split, disjoint from the pool. These are not
  NOAH's images (NOAH drew from CoOp's split files); the report says so
  through the data fingerprints.

Split names of a few-shot task: "train" (the shots), "val" (NOAH's val list;
no TFDS equivalent) and "test".
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vpt_jax import errors
from vpt_jax.data import files
from vpt_jax.data import source_protocols

SHOTS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class FewShotDataset:
  """One dataset of NOAH's few-shot benchmark.

  Attributes:
    name: registry key (``fewshot/<name>``).
    title: as papers print it.
    num_classes: classes (NOAH's ``build_dataset``).
    noah_folder: its folder in NOAH's repository (``data/few-shot/<folder>``).
    image_dirs: split -> the folder below ``data.path`` the list's paths start in.
    lists: "val"/"test" -> the list file below ``annotations/``.
    tfds_builder: TFDS name:version for TFDS 4.9.10, or "" when there is none.
    tfds_pool: the TFDS split the shots are drawn from.
    tfds_test: the TFDS split tested on.
  """
  name: str
  title: str
  num_classes: int
  noah_folder: str
  image_dirs: Mapping[str, str]
  lists: Mapping[str, str]
  tfds_builder: str
  tfds_pool: str = "train"
  tfds_test: str = "test"


_IMAGES = {"train": "images", "val": "images", "test": "images"}
_LISTS = {"val": "val_meta.list", "test": "test_meta.list"}

DATASETS = {d.name: d for d in (
    FewShotDataset("fgvc_aircraft", "FGVC-Aircraft", 100, "fgvc-aircraft", _IMAGES, _LISTS, ""),
    # TFDS's "validation" is Food-101's official test set.
    FewShotDataset("food101", "Food-101", 101, "food101", _IMAGES, _LISTS, "food101:2.0.0",
                   tfds_test="validation"),
    # TFDS train holds 10 images per class: the pool adds validation (20 per class).
    FewShotDataset("oxford_flowers", "Oxford Flowers", 102, "oxford-flowers102", _IMAGES,
                   _LISTS, "oxford_flowers102:2.1.1", tfds_pool="train+validation"),
    FewShotDataset("oxford_pets", "Oxford Pets", 37, "oxford-pets", _IMAGES, _LISTS,
                   "oxford_iiit_pet:4.0.0"),
    # NOAH's folder is spelt "standford-cars"; its paths start in the folder itself.
    FewShotDataset("stanford_cars", "Stanford Cars", 196, "standford-cars",
                   {"train": "", "val": "", "test": ""}, _LISTS, "cars196:2.1.0"),
    FewShotDataset("imagenet", "ImageNet-1k", 1000, "imagenet",
                   {"train": "train", "val": "train", "test": "val"},
                   {"val": "unofficial_val_list_4_shot16seed0", "test": "val_meta.list"},
                   "imagenet2012:5.1.0", tfds_test="validation"),
)}
FGVC = ("fgvc_aircraft", "food101", "oxford_flowers", "oxford_pets", "stanford_cars")
ALIASES = {"aircraft": "fgvc_aircraft", "fgvc-aircraft": "fgvc_aircraft", "food-101": "food101",
           "flowers": "oxford_flowers", "oxford_flowers102": "oxford_flowers",
           "pets": "oxford_pets", "oxford_iiit_pet": "oxford_pets", "cars": "stanford_cars",
           "cars196": "stanford_cars", "imagenet2012": "imagenet"}


def get_dataset(name: str) -> FewShotDataset:
  """A dataset by name or alias (case-insensitive)."""
  key = ALIASES.get(name.lower(), name.lower())
  if key not in DATASETS:
    raise errors.unknown_name("few-shot dataset", name, DATASETS, ALIASES, matched=key,
                              choices=f"choose one of {', '.join(DATASETS)}")
  return DATASETS[key]


def check_shots(shots: int, seed: int) -> Optional[str]:
  """The problem with a (shots, seed) choice, or None."""
  if shots not in SHOTS:
    return (f"data.shots={shots} is not one of NOAH's shot counts {SHOTS}; set "
            "--config.data.shots to one of them")
  if seed < 0:
    return f"data.shots_seed={seed} must be >= 0 (NOAH's draws are 0, 1 and 2)"
  return None


# ------------------------------------------------------------------ NOAH's lists

def list_file(dataset: FewShotDataset, path: str, split: str, shots: int, seed: int) -> str:
  """The NOAH list file of a split."""
  if split == "train":
    name = f"train_meta.list.num_shot_{shots}.seed_{seed}"
  else:
    name = dataset.lists[split]
  return os.path.join(path, "annotations", name)


def noah_source(dataset: FewShotDataset, path: str, split: str, shots: int,
                seed: int, skip_corrupt: bool = False) -> files.FileSource:
  """A split read from NOAH's list files below ``path`` (the dataset folder)."""
  if split not in SPLITS:
    raise errors.UserError(f"fewshot/{dataset.name} has the splits {SPLITS}, not {split!r}; "
                           "fix --config.data.train_split/eval_split/test_split")
  list_path = list_file(dataset, path, split, shots, seed)
  if not tf.io.gfile.exists(list_path):
    raise errors.MissingInputError(
        f"NOAH list {list_path} is missing; copy data/few-shot/{dataset.noah_folder}/"
        f"annotations/ from NOAH's repository into {path}")
  root = os.path.join(path, dataset.image_dirs[split])
  rows = files.read_list(list_path, root)
  return files.labelled_files(f"NOAH list {list_path}", split, rows, dataset.num_classes,
                              skip_corrupt=skip_corrupt)


# ------------------------------------------------------------- drawn from TFDS

def draw_positions(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """The positions of a pool kept as the shots of draw ``seed`` (the module's rule).

  Args:
    labels: int (P,) class of each pool position, in stored order.
    shots: N, images per class.
    seed: the draw.

  Returns:
    int64 (K,) ascending positions, N per class of ``labels`` (fewer for a class
    with fewer than N images; ``check_counts`` refuses those).
  """
  labels = np.asarray(labels)
  order = np.random.default_rng(seed).permutation(len(labels))
  permuted = labels[order]
  by_class = np.argsort(permuted, kind="stable")  # permutation order within a class
  sorted_labels = permuted[by_class]
  rank = np.empty(len(labels), np.int64)
  rank[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels)
  return np.sort(order[rank < shots])


def check_counts(labels: np.ndarray, num_classes: int, shots: int, what: str) -> None:
  """Refuses a pool in which a class has fewer than ``shots`` images."""
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
  short = np.flatnonzero(counts < shots)
  if short.size:
    cls = int(short[0])
    raise errors.UserError(
        f"{what}: class {cls} has {counts[cls]} image(s), fewer than data.shots={shots} "
        f"({short.size} class(es) short); choose fewer shots")


def _stored_order(add_tfds_id: bool = False) -> tfds.ReadConfig:
  """Reads a split's files one after another: position k is the k-th stored example.

  (TFDS's default interleaves 16 files at a time, so positions would depend on
  the read settings.)
  """
  return tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=add_tfds_id)


@functools.lru_cache(maxsize=8)
def pool_labels(builder_name: str, split: str, data_dir: Optional[str]) -> np.ndarray:
  """int64 (P,) labels of a prepared TFDS split in stored order, read-only.

  Only the labels are decoded; cached, since a run builds its sources several
  times (checks, training set, fingerprint) and ImageNet's pool is 1.28M records.
  """
  builder = tfds.builder(builder_name, data_dir=data_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=_stored_order(),
                          decoders=tfds.decode.PartialDecoding({"label": True}))
  chunks = [batch["label"] for batch in tfds.as_numpy(ds.batch(4096))]
  labels = np.concatenate(chunks).astype(np.int64) if chunks else np.zeros((0,), np.int64)
  labels.flags.writeable = False
  return labels


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsShotSource:
  """The shots drawn from a TFDS split; implements source_protocols.ExampleSource.

  Attributes:
    builder: TFDS name[:version].
    split: the pool's split string.
    data_dir: TFDS data_dir (None: the TFDS default).
    positions: int64 (K,) ascending positions of the pool kept (``draw_positions``).
    classes: number of classes.
  """
  builder: str
  split: str
  data_dir: Optional[str]
  positions: np.ndarray
  classes: int

  def _share(self, process_index: int, process_count: int) -> np.ndarray:
    return np.array_split(self.positions, process_count)[process_index]

  def size(self, process_index: int = 0, process_count: int = 1) -> int:
    return len(self._share(process_index, process_count))

  def num_classes(self) -> int:
    return self.classes

  def class_names(self) -> Optional[list[str]]:
    return source_protocols.class_names(
        source_protocols.ImageSource(self.builder, self.split, self.data_dir))

  def examples(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """{"image": uint8 (H, W, 3), "label": int32} of the kept positions, in pool order."""
    builder = tfds.builder(self.builder, data_dir=self.data_dir)
    image_feature = builder.info.features["image"]
    keep = np.zeros(builder.info.splits[self.split].num_examples, bool)
    keep[self._share(process_index, process_count)] = True
    keep = tf.constant(keep)
    ds = builder.as_dataset(split=self.split, shuffle_files=False, read_config=_stored_order(),
                            decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.enumerate().filter(lambda i, example: tf.gather(keep, i)).map(
        lambda i, example: example)
    return ds.map(lambda example: {
        "image": image_feature.decode_example(example["image"]),
        "label": tf.cast(example["label"], tf.int32)}, num_parallel_calls=tf.data.AUTOTUNE)


  def example_ids(self) -> list[str]:
    """TFDS's ids of the kept examples, in the order ``examples`` reads them."""
    builder = tfds.builder(self.builder, data_dir=self.data_dir)
    ds = builder.as_dataset(split=self.split, shuffle_files=False,
                            read_config=_stored_order(add_tfds_id=True),
                            decoders={"image": tfds.decode.SkipDecoding()})
    ids = [t.decode() for t in ds.map(lambda e: e["tfds_id"]).as_numpy_iterator()]
    return [ids[i] for i in self.positions]


def tfds_source(dataset: FewShotDataset, split: str, shots: int, seed: int,
                data_dir: Optional[str]) -> source_protocols.AnySource:
  """A split of a few-shot dataset through TFDS (the module's shot rule for "train")."""
  if not dataset.tfds_builder:
    raise errors.UserError(
        f"{dataset.title} has no TFDS builder: download it (CoOp's DATASETS.md), copy "
        f"NOAH's data/few-shot/{dataset.noah_folder}/annotations/ beside its images and set "
        "--config.data.path to that folder")
  if split == "test":
    return source_protocols.ImageSource(dataset.tfds_builder, dataset.tfds_test, data_dir)
  if split != "train":
    raise errors.UserError(
        f"fewshot/{dataset.name} through TFDS has the splits train (the shots) and test, "
        f"not {split!r}; NOAH's val list needs --config.data.path")
  source_protocols.prepared_builder(  # refuses an unprepared dataset with the fix
      source_protocols.ImageSource(dataset.tfds_builder, dataset.tfds_pool, data_dir))
  labels = pool_labels(dataset.tfds_builder, dataset.tfds_pool, data_dir)
  what = f"{dataset.tfds_builder} split {dataset.tfds_pool!r}"
  check_counts(labels, dataset.num_classes, shots, what)
  return TfdsShotSource(dataset.tfds_builder, dataset.tfds_pool, data_dir,
                        draw_positions(labels, shots, seed), dataset.num_classes)


def make_source(name: str, split: str, *, shots: int, seed: int, path: str = "",
                data_dir: Optional[str] = None,
                skip_corrupt: bool = False) -> source_protocols.AnySource:
  """The source of one split of ``fewshot/<name>`` (NOAH's lists with ``path``, else TFDS)."""
  problem = check_shots(shots, seed)
  if problem:
    raise errors.UserError(problem)
  dataset = get_dataset(name)
  if path:
    return noah_source(dataset, path, split, shots, seed, skip_corrupt)
  return tfds_source(dataset, split, shots, seed, data_dir)
