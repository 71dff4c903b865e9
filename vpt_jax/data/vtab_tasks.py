"""The 19 VTAB-1k tasks: TFDS builders, versions, split strings, label functions, classes.

Everything here follows the reference code (google-research/task_adaptation,
as VPT uses it; see ../shared/reference/vtab.md) and pins the TFDS versions
that build with the TFDS we install (4.9.10). Each task says:

* ``builder``: TFDS name[/config]:version for TFDS 4.9.10, with the reference's
  string (``reference_builder``) and the version VPT used (``vpt_version``).
* the four VTAB-1k splits, both as literal TFDS split strings (``splits``) and
  as the rule the reference applies to the TFDS split sizes
  (``compute_splits``); ``vtab.resolve_split`` uses the rule on the sizes of
  the prepared dataset, as the reference does, and warns if they move a
  boundary.
* ``preprocess``: raw TFDS example -> {"image": uint8 (H, W, 3), "label":
  int32}, the task's label function (``vtab_labels``).
* ``num_classes`` (never counted from the 1k examples: SUN397's train800 holds
  only ~309 of its 397 classes), ``group`` and whether it needs a manual
  download (``manual_download`` holds the steps, shown when data is missing).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Optional

from vpt_jax import errors
from vpt_jax.data import vtab_labels

GROUPS = ("natural", "specialized", "structured")
SPLIT_NAMES = ("train800", "val200", "train800val200", "test")
TRAIN_EXAMPLES = 800
VAL_EXAMPLES = 200



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


def _split_strings(val200: str, test: str) -> dict[str, str]:
  """The four VTAB-1k split strings; train800 is always the first 800 of TFDS train."""
  train800 = f"train[:{TRAIN_EXAMPLES}]"
  return {"train800": train800, "val200": val200,
          "train800val200": f"{train800}+{val200}", "test": test}


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
  return _split_strings(val200, test)


def _task(name, title, group, builder, reference_builder, vpt_version, num_classes,
          preprocess, label_feature, *, val200, test, **kwargs) -> VtabTask:
  """Builds a task from its literal val200 and test strings (train800 is
  always "train[:800]"); tests check them against ``compute_splits``."""
  return VtabTask(name, title, group, builder, reference_builder, vpt_version,
                  num_classes, preprocess, label_feature, splits=_split_strings(val200, test),
                  **kwargs)


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
          100, vtab_labels.plain_label, "label (fine)", val_from="train", train_percent=90,
          test_from="test", val200="train[45000:45200]", test="test",
          reference_sizes={"train": 50000, "test": 10000}, test_size=10000,
          download="168.5 MB"),
    _task("caltech101", "Caltech101", "natural", "caltech101:3.0.2", "caltech101:3.*.*",
          "3.0.1", 102, vtab_labels.plain_label, "label", val_from="train", train_percent=90,
          test_from="test", val200="train[2754:2954]", test="test",
          reference_sizes={"train": 3060, "test": 6084}, test_size=6084,
          download="137.4 MB"),
    _task("dtd", "DTD", "natural", "dtd:3.0.1", "dtd:3.*.*", "3.0.1", 47,
          vtab_labels.plain_label, "label", val_from="validation", test_from="test",
          val200="validation[:200]", test="test",
          reference_sizes={"train": 1880, "validation": 1880, "test": 1880},
          test_size=1880,
          download="625.2 MB"),
    _task("oxford_flowers102", "Flowers102", "natural", "oxford_flowers102:2.1.1",
          "oxford_flowers102:2.*.*", "2.1.1", 102, vtab_labels.plain_label, "label",
          val_from="validation", test_from="test",
          val200="validation[:200]", test="test",
          reference_sizes={"train": 1020, "validation": 1020, "test": 6149},
          test_size=6149,
          download="344.9 MB; needs scipy"),
    # TFDS 4.9.10 ships only oxford_iiit_pet 4.0.0 (same example keys and order;
    # a dozen corrupt JPEGs re-encoded); the reference's 3.*.* no longer loads.
    _task("oxford_iiit_pet", "Pets", "natural", "oxford_iiit_pet:4.0.0",
          "oxford_iiit_pet:3.*.*", "3.2.0", 37, vtab_labels.plain_label, "label (breed)",
          val_from="train", train_percent=80, test_from="test",
          val200="train[2944:3144]", test="test",
          reference_sizes={"train": 3680, "test": 3669}, test_size=3669,
          download="811.1 MB"),
    _task("svhn", "SVHN", "natural", "svhn_cropped:3.1.0", "svhn_cropped:3.*.*", "3.0.0",
          10, vtab_labels.plain_label, "label", val_from="train", train_percent=90,
          test_from="test", val200="train[65931:66131]", test="test",
          reference_sizes={"train": 73257, "test": 26032}, test_size=26032,
          download="1.58 GB (includes the unused 'extra' split)"),
    # TFDS 4.9.10 skips one undecodable train image (76,127 instead of 76,128);
    # the splits here use validation and test only, so they do not move.
    _task("sun397", "Sun397", "natural", "sun397/tfds:4.0.0", "sun397/tfds:4.*.*", "4.0.0",
          397, vtab_labels.plain_label, "label", val_from="validation", test_from="test",
          val200="validation[:200]", test="test",
          reference_sizes={"train": 76128, "validation": 10875, "test": 21750},
          test_size=21750,
          download="39.1 GB; needs opencv-python; slow to build"),
    # Specialized
    _task("patch_camelyon", "Camelyon", "specialized", "patch_camelyon:2.0.0",
          "patch_camelyon:2.*.*", "2.0.0", 2, vtab_labels.plain_label, "label",
          val_from="validation", test_from="test", val200="validation[:200]", test="test",
          reference_sizes={"train": 262144, "validation": 32768, "test": 32768},
          test_size=32768, download="8.03 GB; needs h5py"),
    _task("eurosat", "EuroSAT", "specialized", "eurosat/rgb:2.0.0", "eurosat/rgb:2.*.*",
          "2.0.0", 10, vtab_labels.plain_label, "label", val_from="train", train_percent=60,
          test_from="train_tail", val_percent=20,
          val200="train[16200:16400]", test="train[21600:]",
          reference_sizes={"train": 27000}, test_size=5400,
          download="94.3 MB"),
    _task("resisc45", "Resisc45", "specialized", "resisc45:3.0.0", "resisc45:3.*.*",
          "3.0.0", 45, vtab_labels.plain_label, "label", val_from="train", train_percent=60,
          test_from="train_tail", val_percent=20,
          val200="train[18900:19100]", test="train[25200:]",
          reference_sizes={"train": 31500}, test_size=6300,
          manual_download=_RESISC45_MANUAL),
    _task("diabetic_retinopathy", "Retinopathy", "specialized",
          "diabetic_retinopathy_detection/btgraham-300:3.0.0",
          "diabetic_retinopathy_detection/btgraham-300:3.*.*", "3.0.0", 5,
          vtab_labels.plain_label, "label (0-4)", val_from="validation", test_from="test",
          val200="validation[:200]", test="test",
          reference_sizes={"train": 35126, "validation": 10906, "test": 42670},
          test_size=42670,
          manual_download=_RETINOPATHY_MANUAL),
    # Structured. CLEVR's TFDS test split has no scene annotations: VTAB tests
    # on TFDS validation.
    _task("clevr_count", "Clevr-Count", num_classes=8, preprocess=vtab_labels.clevr_count,
          label_feature="objects/size (count)",
          class_names=tuple(f"{n} objects" for n in range(3, 11)), **_CLEVR),
    _task("clevr_dist", "Clevr-Dist", num_classes=6, preprocess=vtab_labels.clevr_distance,
          label_feature="objects/pixel_coords[:, 2]",
          class_names=("d<=8.0", "8.0<d<=8.5", "8.5<d<=9.0", "9.0<d<=9.5", "9.5<d<=10.0",
                       "d>10.0"), **_CLEVR),
    _task("dmlab", "DMLab", "structured", "dmlab:2.0.1", "dmlab:2.0.1", "2.0.1", 6,
          vtab_labels.plain_label, "label", val_from="validation", test_from="test",
          val200="validation[:200]", test="test",
          reference_sizes={"train": 65550, "validation": 22628, "test": 22735},
          test_size=22735,
          download="3.02 GB"),
    # kitti:3.1.0 (the reference's pin) cannot be generated by any modern TFDS;
    # 3.2.0/3.3.0 give the same data (task_adaptation #18).
    _task("kitti_dist", "KITTI-Dist", "structured", "kitti:3.3.0", "kitti:3.1.0", "3.2.0", 4,
          vtab_labels.kitti_distance, "objects/location[:, 2] of type < 3",
          val_from="validation", test_from="test", val200="validation[:200]", test="test",
          reference_sizes={"train": 6347, "validation": 423, "test": 711},
          test_size=711, class_names=("d<=8m", "8m<d<=20m", "d>20m", "no vehicle"),
          download="12.58 GB; needs opencv-python"),
    _task("dsprites_loc", "dSpr-Loc", num_classes=16, label_feature="label_x_position // 2",
          preprocess=functools.partial(vtab_labels.dsprites, attribute="label_x_position",
                                       num_original=32),
          **_DSPRITES),
    _task("dsprites_ori", "dSpr-Ori", num_classes=16,
          label_feature="floor(label_orientation / 2.5)",
          preprocess=functools.partial(vtab_labels.dsprites, attribute="label_orientation",
                                       num_original=40),
          **_DSPRITES),
    _task("smallnorb_azim", "sNORB-Azim", num_classes=18, label_feature="label_azimuth",
          preprocess=functools.partial(vtab_labels.smallnorb, attribute="label_azimuth"),
          **_SMALLNORB),
    _task("smallnorb_elev", "sNORB-Elev", num_classes=9, label_feature="label_elevation",
          preprocess=functools.partial(vtab_labels.smallnorb, attribute="label_elevation"),
          **_SMALLNORB),
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
    raise errors.unknown_name("VTAB task", name, TASKS, ALIASES,
                              choices=f"the 19 tasks: {', '.join(TASKS)}")
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
