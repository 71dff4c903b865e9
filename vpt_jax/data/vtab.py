r"""The 19 VTAB-1k tasks: TFDS builders, split strings, label functions, classes.

Everything here follows the reference code (google-research/task_adaptation,
as VPT uses it; see ../shared/reference/vtab.md) and pins the TFDS versions
that build with the TFDS we install (4.9.10). Each task says:

* ``builder``: TFDS name[/config]:version for TFDS 4.9.10, with the reference's
  string (``reference_builder``) and the version VPT used (``vpt_version``).
* the four VTAB-1k splits, both as literal TFDS split strings (``splits``) and
  as the rule the reference applies to the TFDS split sizes
  (``compute_splits``); ``resolve_split`` uses the rule on the sizes of the
  prepared dataset, as the reference does, and warns if they move a boundary.
* ``preprocess``: raw TFDS example -> {"image": uint8 (H, W, 3), "label":
  int32}, the task's label function (CLEVR count - 3, distance bins, dSprites
  bins, smallNORB attributes; greyscale tiled to RGB).
* ``num_classes`` (never counted from the 1k examples: SUN397's train800 holds
  only ~309 of its 397 classes), ``group`` and whether it needs a manual
  download (``manual_download`` holds the steps, shown when data is missing).

Command line::

  python -m vpt_jax.data.vtab list
  python -m vpt_jax.data.vtab prepare dmlab+eurosat --data_dir ~/tensorflow_datasets \
      [--manual_dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import sys
from typing import Callable, Mapping, Optional

import tensorflow as tf

GROUPS = ("natural", "specialized", "structured")
SPLIT_NAMES = ("train800", "val200", "train800val200", "test")
TRAIN_EXAMPLES = 800
VAL_EXAMPLES = 200


# ----------------------------------------------------------------- label functions
# Each takes a raw TFDS example (dict of tensors) and returns
# {"image": uint8 (H, W, 3), "label": int32 ()}.

def _rgb(image):
  """Tiles a greyscale (H, W, 1) image to RGB; RGB passes through."""
  if image.shape[-1] == 1:
    return tf.tile(image, [1, 1, 3])
  return image


def _count_below(thresholds, value):
  """max{i : thresholds[i] < value} for ascending thresholds (-1 if none).

  The reference computes reduce_max(where(thresholds - value < 0)); for sorted
  thresholds that is the number of thresholds strictly below value, minus one.
  """
  below = tf.cast(tf.constant(thresholds, tf.float32) < tf.cast(value, tf.float32), tf.int32)
  return tf.reduce_sum(below) - 1


def plain_label(example, label_key: str = "label"):
  """The TFDS ClassLabel as it is."""
  return {"image": _rgb(example["image"]), "label": tf.cast(example[label_key], tf.int32)}


def clevr_count(example):
  """Number of objects - 3 (CLEVR scenes hold 3..10 objects: labels 0..7)."""
  count = tf.size(example["objects"]["size"])
  return {"image": _rgb(example["image"]), "label": tf.cast(count - 3, tf.int32)}


CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)


def clevr_distance(example):
  """Bin of the closest object's depth (pixel_coords[:, 2]); 6 classes.

  0: d <= 8.0, 1: (8.0, 8.5], 2: (8.5, 9.0], 3: (9.0, 9.5], 4: (9.5, 10.0],
  5: (10.0, 100].
  """
  depth = tf.reduce_min(example["objects"]["pixel_coords"][:, 2])
  return {"image": _rgb(example["image"]),
          "label": _count_below(CLEVR_DISTANCE_THRESHOLDS, depth)}


KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
# KITTI object types Car=0, Van=1, Truck=2 are the vehicles.
KITTI_VEHICLE_TYPES = 3
KITTI_NO_VEHICLE_DEPTH = 1000.0


def kitti_distance(example):
  """Bin of the closest vehicle's depth (location[:, 2] of car/van/truck); 4 classes.

  0: d <= 8 m, 1: (8, 20], 2: (20, 999], 3: no vehicle (the reference appends
  a depth of 1000 before taking the minimum).
  """
  objects = example["objects"]
  vehicles = objects["type"] < KITTI_VEHICLE_TYPES
  depths = tf.boolean_mask(objects["location"][:, 2], vehicles)
  depths = tf.concat([tf.cast(depths, tf.float32), [KITTI_NO_VEHICLE_DEPTH]], axis=0)
  return {"image": _rgb(example["image"]),
          "label": _count_below(KITTI_DISTANCE_THRESHOLDS, tf.reduce_min(depths))}


def dsprites(example, attribute: str, num_original: int, num_classes: int = 16):
  """floor(attribute / (num_original / num_classes)); image {0,1} -> {0,255} RGB.

  Location: 32 x positions / 2 -> 16 classes; orientation: 40 values / 2.5 ->
  16 bins of alternating size 3, 2, 3, 2, ...
  """
  factor = num_original / num_classes
  label = tf.math.floordiv(tf.cast(example[attribute], tf.float32), factor)
  # Forgetting the x255 leaves an almost black image.
  return {"image": _rgb(example["image"]) * 255, "label": tf.cast(label, tf.int32)}


def smallnorb(example, attribute: str):
  """The raw attribute (azimuth 0..17, elevation 0..8); first image of the pair."""
  return {"image": _rgb(example["image"]), "label": tf.cast(example[attribute], tf.int32)}


# ----------------------------------------------------------------- the registry

@dataclasses.dataclass(frozen=True)
class VtabTask:
  """One VTAB-1k task.

  Attributes:
    name: registry key, e.g. "clevr_count".
    title: the name papers print, e.g. "Clevr-Count".
    group: one of GROUPS.
    builder: TFDS name[/config]:version that builds with TFDS 4.9.10.
    reference_builder: task_adaptation's string (vtab.md 2).
    vpt_version: the TFDS version VPT used.
    num_classes: the task's classes (hard-coded, as the reference).
    preprocess: raw example -> {"image": uint8 (H, W, 3), "label": int32}.
    label_feature: the raw feature(s) the label comes from (documentation).
    val_from: where val200 comes from: "train" (the 200 examples after the
      first train_percent % of TFDS train), "validation" or "test" (their
      first 200).
    train_percent: the reference's train share of TFDS train, for
      val_from="train".
    test_from: "test", "validation" (CLEVR), "train_tail" (the examples of
      TFDS train after train_percent + val_percent %) or "test_half"
      (smallNORB: the second half of TFDS test).
    val_percent: for test_from="train_tail".
    reference_sizes: TFDS split sizes at the reference's versions (those the
      literal splits derive from).
    test_size: examples in ``splits["test"]``.
    splits: the four VTAB-1k split strings, literally.
    class_names: for derived labels (None: the TFDS ClassLabel's names).
    manual_download: steps to obtain the data by hand ("" if TFDS downloads it).
    download: size and requirements of the automatic download.
  """
  name: str
  title: str
  group: str
  builder: str
  reference_builder: str
  vpt_version: str
  num_classes: int
  preprocess: Callable
  label_feature: str
  val_from: str
  test_from: str
  reference_sizes: Mapping[str, int]
  test_size: int
  splits: Mapping[str, str]
  train_percent: int = 0
  val_percent: int = 0
  class_names: Optional[tuple[str, ...]] = None
  manual_download: str = ""
  download: str = ""

  @property
  def tfds_name(self) -> str:
    """The builder without its version, e.g. "eurosat/rgb"."""
    return self.builder.split(":")[0]


def compute_splits(task: VtabTask, sizes: Mapping[str, int]) -> dict[str, str]:
  """The four split strings the reference derives from TFDS split sizes.

  Integer arithmetic as task_adaptation: e.g. Caltech101's val200 starts at
  90 * 3060 // 100 = 2754; EuroSAT's test starts at 60 % + 20 % of 27,000.

  Args:
    task: the task.
    sizes: {"train": n, ...} TFDS split sizes (only "train" is read, and only
      by tasks that cut TFDS train).
  """
  if task.val_from == "train":
    train_count = task.train_percent * sizes["train"] // 100
    val200 = f"train[{train_count}:{train_count + VAL_EXAMPLES}]"
  else:
    val200 = f"{task.val_from}[:{VAL_EXAMPLES}]"
  if task.test_from == "train_tail":
    start = (task.train_percent * sizes["train"] // 100
             + task.val_percent * sizes["train"] // 100)
    test = f"train[{start}:]"
  elif task.test_from == "test_half":
    test = "test[50%:]"
  else:
    test = task.test_from
  train800 = f"train[:{TRAIN_EXAMPLES}]"
  return {"train800": train800, "val200": val200,
          "train800val200": f"{train800}+{val200}", "test": test}


def _task(name, title, group, builder, reference_builder, vpt_version, num_classes,
          preprocess, label_feature, *, val200, test, **kwargs) -> VtabTask:
  """Builds a task from its literal val200 and test strings (train800 is
  always "train[:800]"); tests check them against ``compute_splits``."""
  train800 = f"train[:{TRAIN_EXAMPLES}]"
  splits = {"train800": train800, "val200": val200,
            "train800val200": f"{train800}+{val200}", "test": test}
  return VtabTask(name, title, group, builder, reference_builder, vpt_version,
                  num_classes, preprocess, label_feature, splits=splits, **kwargs)


_RESISC45_MANUAL = (
    "Resisc45 needs a manual download. Download NWPU-RESISC45.rar from the OneDrive "
    "link on https://www.tensorflow.org/datasets/catalog/resisc45 (the TFDS docs), "
    "extract it with unrar so that MANUAL_DIR/NWPU-RESISC45/<class>/*.jpg exists, then "
    "run: python -m vpt_jax.data.vtab prepare resisc45 --data_dir DATA_DIR "
    "--manual_dir MANUAL_DIR")
_RETINOPATHY_MANUAL = (
    "Diabetic Retinopathy needs a manual download (about 80-90 GB) from Kaggle: "
    "`kaggle competitions download -c diabetic-retinopathy-detection`. Check that all "
    "five train.zip.001..005 parts arrived (the 'download all' button can miss "
    "train.zip.005), join them with `cat train.zip.* > train.zip` and extract (use "
    "`jar xvf` if unzip fails on the large zip) so that MANUAL_DIR holds train/*.jpeg, "
    "trainLabels.csv, test/*.jpeg and sample/; install opencv-python (the btgraham-300 "
    "config re-encodes with OpenCV), then run: python -m vpt_jax.data.vtab prepare "
    "diabetic_retinopathy --data_dir DATA_DIR --manual_dir MANUAL_DIR")

# What the two tasks on each of CLEVR, dSprites and smallNORB share.
_CLEVR = dict(
    group="structured", builder="clevr:3.1.0", reference_builder="clevr:3.*.*",
    vpt_version="3.1.0", val_from="train", train_percent=90, test_from="validation",
    val200="train[63000:63200]", test="validation",
    reference_sizes={"train": 70000, "validation": 15000, "test": 15000}, test_size=15000,
    download="19.02 GB")
_DSPRITES = dict(
    group="structured", builder="dsprites:2.0.0", reference_builder="dsprites:2.*.*",
    vpt_version="2.0.0", val_from="train", train_percent=80, test_from="train_tail",
    val_percent=10, val200="train[589824:590024]", test="train[663552:]",
    reference_sizes={"train": 737280}, test_size=73728, download="28 MB; needs h5py")
_SMALLNORB = dict(
    group="structured", builder="smallnorb:2.0.0", reference_builder="smallnorb:2.*.*",
    vpt_version="2.0.0", val_from="test", test_from="test_half", val200="test[:200]",
    test="test[50%:]", reference_sizes={"train": 24300, "test": 24300}, test_size=12150,
    download="262 MB")

_TASK_LIST = (
    # Natural
    _task("cifar100", "CIFAR-100", "natural", "cifar100:3.0.2", "cifar100:3.*.*", "3.0.2",
          100, plain_label, "label (fine)", val_from="train", train_percent=90,
          test_from="test", val200="train[45000:45200]", test="test",
          reference_sizes={"train": 50000, "test": 10000}, test_size=10000,
          download="168.5 MB"),
    _task("caltech101", "Caltech101", "natural", "caltech101:3.0.2", "caltech101:3.*.*",
          "3.0.1", 102, plain_label, "label", val_from="train", train_percent=90,
          test_from="test", val200="train[2754:2954]", test="test",
          reference_sizes={"train": 3060, "test": 6084}, test_size=6084,
          download="137.4 MB"),
    _task("dtd", "DTD", "natural", "dtd:3.0.1", "dtd:3.*.*", "3.0.1", 47, plain_label,
          "label", val_from="validation", test_from="test",
          val200="validation[:200]", test="test",
          reference_sizes={"train": 1880, "validation": 1880, "test": 1880},
          test_size=1880,
          download="625.2 MB"),
    _task("oxford_flowers102", "Flowers102", "natural", "oxford_flowers102:2.1.1",
          "oxford_flowers102:2.*.*", "2.1.1", 102, plain_label, "label",
          val_from="validation", test_from="test",
          val200="validation[:200]", test="test",
          reference_sizes={"train": 1020, "validation": 1020, "test": 6149},
          test_size=6149,
          download="344.9 MB; needs scipy"),
    # TFDS 4.9.10 ships only oxford_iiit_pet 4.0.0 (same example keys and order;
    # a dozen corrupt JPEGs re-encoded); the reference's 3.*.* no longer loads.
    _task("oxford_iiit_pet", "Pets", "natural", "oxford_iiit_pet:4.0.0",
          "oxford_iiit_pet:3.*.*", "3.2.0", 37, plain_label, "label (breed)",
          val_from="train", train_percent=80, test_from="test",
          val200="train[2944:3144]", test="test",
          reference_sizes={"train": 3680, "test": 3669}, test_size=3669,
          download="811.1 MB"),
    _task("svhn", "SVHN", "natural", "svhn_cropped:3.1.0", "svhn_cropped:3.*.*", "3.0.0",
          10, plain_label, "label", val_from="train", train_percent=90, test_from="test",
          val200="train[65931:66131]", test="test",
          reference_sizes={"train": 73257, "test": 26032}, test_size=26032,
          download="1.58 GB (includes the unused 'extra' split)"),
    # TFDS 4.9.10 skips one undecodable train image (76,127 instead of 76,128);
    # the splits here use validation and test only, so they do not move.
    _task("sun397", "Sun397", "natural", "sun397/tfds:4.0.0", "sun397/tfds:4.*.*", "4.0.0",
          397, plain_label, "label", val_from="validation", test_from="test",
          val200="validation[:200]", test="test",
          reference_sizes={"train": 76128, "validation": 10875, "test": 21750},
          test_size=21750,
          download="39.1 GB; needs opencv-python; slow to build"),
    # Specialized
    _task("patch_camelyon", "Camelyon", "specialized", "patch_camelyon:2.0.0",
          "patch_camelyon:2.*.*", "2.0.0", 2, plain_label, "label", val_from="validation",
          test_from="test", val200="validation[:200]", test="test",
          reference_sizes={"train": 262144, "validation": 32768, "test": 32768},
          test_size=32768, download="8.03 GB; needs h5py"),
    _task("eurosat", "EuroSAT", "specialized", "eurosat/rgb:2.0.0", "eurosat/rgb:2.*.*",
          "2.0.0", 10, plain_label, "label", val_from="train", train_percent=60,
          test_from="train_tail", val_percent=20,
          val200="train[16200:16400]", test="train[21600:]",
          reference_sizes={"train": 27000}, test_size=5400,
          download="94.3 MB"),
    _task("resisc45", "Resisc45", "specialized", "resisc45:3.0.0", "resisc45:3.*.*",
          "3.0.0", 45, plain_label, "label", val_from="train", train_percent=60,
          test_from="train_tail", val_percent=20,
          val200="train[18900:19100]", test="train[25200:]",
          reference_sizes={"train": 31500}, test_size=6300,
          manual_download=_RESISC45_MANUAL),
    _task("diabetic_retinopathy", "Retinopathy", "specialized",
          "diabetic_retinopathy_detection/btgraham-300:3.0.0",
          "diabetic_retinopathy_detection/btgraham-300:3.*.*", "3.0.0", 5, plain_label,
          "label (0-4)", val_from="validation", test_from="test",
          val200="validation[:200]", test="test",
          reference_sizes={"train": 35126, "validation": 10906, "test": 42670},
          test_size=42670,
          manual_download=_RETINOPATHY_MANUAL),
    # Structured. CLEVR's TFDS test split has no scene annotations: VTAB tests
    # on TFDS validation.
    _task("clevr_count", "Clevr-Count", num_classes=8, preprocess=clevr_count,
          label_feature="objects/size (count)",
          class_names=tuple(f"{n} objects" for n in range(3, 11)), **_CLEVR),
    _task("clevr_dist", "Clevr-Dist", num_classes=6, preprocess=clevr_distance,
          label_feature="objects/pixel_coords[:, 2]",
          class_names=("d<=8.0", "8.0<d<=8.5", "8.5<d<=9.0", "9.0<d<=9.5", "9.5<d<=10.0",
                       "d>10.0"), **_CLEVR),
    _task("dmlab", "DMLab", "structured", "dmlab:2.0.1", "dmlab:2.0.1", "2.0.1", 6,
          plain_label, "label", val_from="validation", test_from="test",
          val200="validation[:200]", test="test",
          reference_sizes={"train": 65550, "validation": 22628, "test": 22735},
          test_size=22735,
          download="3.02 GB"),
    # kitti:3.1.0 (the reference's pin) cannot be generated by any modern TFDS;
    # 3.2.0/3.3.0 give the same data (task_adaptation #18).
    _task("kitti_dist", "KITTI-Dist", "structured", "kitti:3.3.0", "kitti:3.1.0", "3.2.0", 4,
          kitti_distance, "objects/location[:, 2] of type < 3", val_from="validation",
          test_from="test", val200="validation[:200]", test="test",
          reference_sizes={"train": 6347, "validation": 423, "test": 711},
          test_size=711, class_names=("d<=8m", "8m<d<=20m", "d>20m", "no vehicle"),
          download="12.58 GB; needs opencv-python"),
    _task("dsprites_loc", "dSpr-Loc", num_classes=16, label_feature="label_x_position // 2",
          preprocess=functools.partial(dsprites, attribute="label_x_position",
                                       num_original=32), **_DSPRITES),
    _task("dsprites_ori", "dSpr-Ori", num_classes=16,
          label_feature="floor(label_orientation / 2.5)",
          preprocess=functools.partial(dsprites, attribute="label_orientation",
                                       num_original=40), **_DSPRITES),
    _task("smallnorb_azim", "sNORB-Azim", num_classes=18, label_feature="label_azimuth",
          preprocess=functools.partial(smallnorb, attribute="label_azimuth"), **_SMALLNORB),
    _task("smallnorb_elev", "sNORB-Elev", num_classes=9, label_feature="label_elevation",
          preprocess=functools.partial(smallnorb, attribute="label_elevation"), **_SMALLNORB),
)

# In the order of the VPT paper's tables.
TASKS: dict[str, VtabTask] = {task.name: task for task in _TASK_LIST}

# Other spellings in use: VPT's DATA.NAME suffixes, the folder names of the
# extracted VTAB-1k package (NOAH, SSF, CVPT, ...) and common short names.
ALIASES = {
    "cifar": "cifar100", "cifar(num_classes=100)": "cifar100",
    "flowers102": "oxford_flowers102", "flowers": "oxford_flowers102",
    "pets": "oxford_iiit_pet", "svhn_cropped": "svhn",
    "camelyon": "patch_camelyon", "pcam": "patch_camelyon",
    "retinopathy": "diabetic_retinopathy",
    "clevr_distance": "clevr_dist", "kitti": "kitti_dist",
    "dsprites_location": "dsprites_loc", "dsprites_orientation": "dsprites_ori",
    "smallnorb_azi": "smallnorb_azim", "smallnorb_ele": "smallnorb_elev",
    "smallnorb_azimuth": "smallnorb_azim", "smallnorb_elevation": "smallnorb_elev",
}


def get_task(name: str) -> VtabTask:
  """A task by name or alias; unknown names fail with the closest valid ones."""
  key = ALIASES.get(name, name)
  if key not in TASKS:
    close = difflib.get_close_matches(name, list(TASKS) + list(ALIASES), n=3)
    raise ValueError(f"Unknown VTAB task {name!r}"
                     + (f" (did you mean {', '.join(close)}?)" if close else "")
                     + f"; the 19 tasks: {', '.join(TASKS)}")
  return TASKS[key]


def task_names(spec: str) -> list[str]:
  """"all", a group name, or "+"-separated task names -> task names, in order."""
  names = []
  for item in filter(None, spec.split("+")):
    if item == "all":
      names.extend(TASKS)
    elif item in GROUPS:
      names.extend(t.name for t in TASKS.values() if t.group == item)
    else:
      names.append(get_task(item).name)
  return list(dict.fromkeys(names))


def resolve_split(task: VtabTask, split: str,
                  sizes: Optional[Mapping[str, int]] = None) -> str:
  """A VTAB split name -> TFDS split string; anything else passes through.

  Args:
    task: the task.
    split: "train800", "val200", "train800val200", "test", or a TFDS split
      string (used as it is).
    sizes: the prepared dataset's TFDS split sizes. The reference computes the
      boundaries from them; None (or no "train" size) uses the literal strings.
  """
  if split not in SPLIT_NAMES:
    return split
  if not sizes or "train" not in sizes:
    return task.splits[split]
  computed = compute_splits(task, sizes)[split]
  if computed != task.splits[split]:
    # The reference would silently follow the sizes; say so, since the numbers
    # are then not comparable with published ones.
    print(f"warning: {task.builder} split sizes {dict(sizes)} differ from the "
          f"reference's {dict(task.reference_sizes)}: {split} is {computed!r}, not "
          f"{task.splits[split]!r} (following the sizes, as the reference does)",
          file=sys.stderr)
  return computed


def missing_data_message(task: VtabTask, data_dir: Optional[str]) -> str:
  """What to do when the task's TFDS dataset is not prepared in data_dir."""
  where = data_dir or "the TFDS default data_dir (~/tensorflow_datasets)"
  if task.manual_download:
    steps = task.manual_download.replace("DATA_DIR", data_dir or "~/tensorflow_datasets")
  else:
    steps = (f"Prepare it with: python -m vpt_jax.data.vtab prepare {task.name} "
             f"--data_dir {data_dir or '~/tensorflow_datasets'} (downloads "
             f"{task.download}), or `tfds build {task.builder}`")
  return (f"VTAB task {task.name!r} needs TFDS {task.builder}, which is not prepared in "
          f"{where}. {steps}. Or point --config.data.data_dir at a directory that "
          "holds it, or --config.data.path at the extracted VTAB-1k folder.")


def format_table() -> str:
  """A markdown table of the registry (for `python -m vpt_jax.data.vtab list`)."""
  lines = ["| task | group | TFDS builder | classes | train800 | val200 | test (size) | "
           "download |", "|---|---|---|---|---|---|---|---|"]
  for t in TASKS.values():
    download = "manual" if t.manual_download else t.download
    lines.append(f"| {t.name} | {t.group} | `{t.builder}` | {t.num_classes} | "
                 f"`{t.splits['train800']}` | `{t.splits['val200']}` | "
                 f"`{t.splits['test']}` ({t.test_size}) | {download} |")
  return "\n".join(lines)


def prepare(names: list[str], data_dir: Optional[str],
            manual_dir: Optional[str] = None) -> None:
  """Downloads and prepares the tasks' TFDS datasets (each builder once)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builders = list(dict.fromkeys(get_task(n).builder for n in names))
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  for builder_name in builders:
    print(f"preparing {builder_name} in {data_dir or 'the TFDS default data_dir'}",
          flush=True)
    tfds.builder(builder_name, data_dir=data_dir).download_and_prepare(
        download_config=config)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m vpt_jax.data.vtab",
                                   description="The VTAB-1k task registry.")
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("list", help="print every task's builder, splits and classes")
  prep = sub.add_parser("prepare", help="download and prepare tasks with TFDS")
  prep.add_argument("tasks", help='"all", a group, or task names joined by "+"')
  prep.add_argument("--data_dir", default=None)
  prep.add_argument("--manual_dir", default=None,
                    help="where the manually downloaded files are (resisc45, retinopathy)")
  args = parser.parse_args(argv)
  if args.command == "list":
    print(format_table())
  else:
    prepare(task_names(args.tasks), args.data_dir, args.manual_dir)


if __name__ == "__main__":
  main()
