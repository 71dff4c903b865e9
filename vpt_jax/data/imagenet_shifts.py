"""ImageNet's shifted test sets for domain generalisation: -V2, -Sketch, -A, -R.

A model trained on (16-shot) ImageNet-1k is scored on each through its TFDS
builder. All four TFDS builders label with ImageNet-1k's 1000-class
``ClassLabel`` (``imagenet2012``'s ``labels.txt``, synsets sorted: the
builders map each image's synset folder to it), so the labels are ImageNet
class indices, not 0..199, and the 1000-way head scores -V2 and -Sketch
directly.

ImageNet-A and -R hold 200 of the 1000 classes. OSU-MLB/ViT_PEFT_Vision
(``engine/trainer.py``, ``data/annotations/project_label_imagenet_a_r.py``),
as Hendrycks et al.'s own evaluation, keeps the logits of those 200 classes
(in ascending class order) and takes the argmax among them, with each label
mapped to its position in the subset: ``subset_top1``. NOAH instead takes the
argmax over all 1000 logits (its ``evaluate`` has no restriction; its lists
keep the 1000-class labels): ``full_top1``. The report shows the restricted
number and gives NOAH's beside it. The two subsets below are the class indices
present in NOAH's ImageNet-A and -R lists, which equal OSU's
``A_CLASS_SUBLIST`` / ``R_CLASS_SUBLIST``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from vpt_jax import errors
from vpt_jax.data import source_protocols

IMAGENET_A_CLASSES = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94,
    96, 97, 99, 105, 107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234,
    235, 254, 277, 283, 287, 291, 295, 298, 301, 306, 307, 308, 309, 310, 311, 313, 314,
    315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386,
    397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456,
    457, 461, 462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543,
    549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627,
    640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752,
    758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815,
    820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897,
    900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971,
    972, 980, 981, 984, 986, 987, 988)

IMAGENET_R_CLASSES = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96,
    97, 99, 100, 105, 107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160,
    161, 162, 163, 171, 172, 178, 187, 195, 199, 203, 207, 208, 219, 231, 232, 234, 235,
    242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289,
    291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330, 334,
    335, 337, 338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388,
    390, 393, 397, 401, 407, 413, 414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462,
    463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593,
    594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768, 774, 776,
    779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907,
    928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963,
    965, 967, 980, 981, 983, 988)


@dataclasses.dataclass(frozen=True)
class ShiftTarget:
  """One shifted test set.

  Attributes:
    name: registry key.
    title: as papers print it.
    tfds_builder: TFDS name[/config]:version for TFDS 4.9.10.
    split: its one TFDS split.
    classes: the ImageNet class indices it holds, ascending (None: all 1000).
    noah_folder: its folder in NOAH's ``data/domain-generalization``.
  """
  name: str
  title: str
  tfds_builder: str
  split: str
  classes: Optional[tuple[int, ...]]
  noah_folder: str


TARGETS = {t.name: t for t in (
    # NOAH's list reads imagenetv2-matched-frequency-format-val.
    ShiftTarget("imagenet_v2", "ImageNet-V2", "imagenet_v2/matched-frequency:3.0.0", "test",
                None, "imagenetv2"),
    ShiftTarget("imagenet_sketch", "ImageNet-Sketch", "imagenet_sketch:1.0.0", "test", None,
                "imagenet-sketch"),
    ShiftTarget("imagenet_a", "ImageNet-A", "imagenet_a:0.1.0", "test", IMAGENET_A_CLASSES,
                "imagenet-adversarial"),
    ShiftTarget("imagenet_r", "ImageNet-R", "imagenet_r:0.2.0", "test", IMAGENET_R_CLASSES,
                "imagenet-rendition"),
)}
IMAGENET_CLASSES = 1000


def get_target(name: str) -> ShiftTarget:
  if name not in TARGETS:
    raise errors.UserError(f"Unknown shifted test set {name!r}; choose from "
                           f"{', '.join(TARGETS)}")
  return TARGETS[name]


def parse_targets(spec: str) -> list[ShiftTarget]:
  """"all" or "+"-joined target names -> targets, in order."""
  names = list(TARGETS) if spec == "all" else [n for n in spec.split("+") if n]
  return [get_target(name) for name in dict.fromkeys(names)]


def target_source(target: ShiftTarget, data_dir: Optional[str]) -> source_protocols.ImageSource:
  """The target's TFDS split (labels: ImageNet-1k class indices)."""
  return source_protocols.ImageSource(target.tfds_builder, target.split, data_dir)


def subset_predictions(logits: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
  """The ImageNet class predicted among ``classes`` only.

  Args:
    logits: (N, 1000) ImageNet-1k logits.
    classes: ascending class indices of the subset (200 for -A and -R).

  Returns:
    int64 (N,) ImageNet class indices, each one of ``classes``.
  """
  subset = np.asarray(classes, np.int64)
  return subset[np.argmax(np.asarray(logits, np.float32)[:, subset], axis=-1)]


def subset_top1(logits: np.ndarray, labels: np.ndarray,
                classes: Optional[tuple[int, ...]]) -> float:
  """Top-1 with the argmax restricted to ``classes`` (None: all), labels 1000-class.

  Equal to OSU's: logits[:, mask] scored against each label's position in the
  subset. A label outside the subset is refused (it would never be right).
  """
  labels = np.asarray(labels, np.int64)
  if classes is None:
    return full_top1(logits, labels)
  outside = ~np.isin(labels, classes)
  if outside.any():
    raise errors.UserError(
        f"label {int(labels[outside][0])} is not one of the subset's {len(classes)} classes; "
        "the TFDS labels must be ImageNet-1k class indices (rebuild the dataset)")
  return float(np.mean(subset_predictions(logits, classes) == labels))


def full_top1(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 over all the logits (NOAH's ImageNet-A/-R number)."""
  return float(np.mean(np.argmax(np.asarray(logits, np.float32), axis=-1)
                       == np.asarray(labels, np.int64)))
