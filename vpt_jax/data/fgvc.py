"""The five FGVC datasets of the VPT paper: TFDS builders and VPT's split files.

Two ways to read each dataset (``sources.make_source`` picks one):

* VPT's own split files (``data.path`` set): ``{train,val,test}.json`` in the
  dataset folder, ``{relative_path: class_id}``, images below ``image_dir``
  (vpt.md 4.3; the folder layout VPT's ``DATA.DATAPATH`` expects).
* The TFDS builder (no ``data.path``), where one exists (not for NABirds). TFDS
  has no validation split for CUB, Dogs and Cars, so "val" is the tail of
  TFDS train with the size of VPT's val split: the same sizes as the paper,
  but not the same images (VPT drew its val at random; its JSON files pin them).

Preprocess FGVC with ``data.preprocess = "resize_crop_flip"`` (resize 256,
random crop 224 and flip for training, centre crop for evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from vpt_jax import errors


@dataclasses.dataclass(frozen=True)
class FgvcDataset:
  """One FGVC dataset.

  Attributes:
    name: registry key.
    title: as papers print it.
    num_classes: classes.
    image_dir: where the JSON files' relative paths start, below the dataset
      folder (VPT's layout).
    tfds_builder: TFDS name:version for TFDS 4.9.10, or "" when there is none.
    tfds_splits: {"train", "val", "test"} -> TFDS split string.
    vpt_sizes: (train, val, test) sizes of VPT's split files [paper Table 8,
      recalled in vpt.md 4.3].
    notes: where to get the data.
  """
  name: str
  title: str
  num_classes: int
  image_dir: str
  tfds_builder: str
  tfds_splits: Mapping[str, str]
  vpt_sizes: tuple[int, int, int]
  notes: str = ""


DATASETS = {d.name: d for d in (
    FgvcDataset("cub", "CUB-200-2011", 200, "images", "caltech_birds2011:0.2.0",
                {"train": "train[:5394]", "val": "train[5394:]", "test": "test"},
                (5394, 600, 5794)),
    FgvcDataset("nabirds", "NABirds", 555, "images", "", {}, (21536, 2393, 24633),
                notes="No TFDS builder: download NABirds from the Cornell Lab "
                      "(https://dl.allaboutbirds.org/nabirds) and VPT's split files, put "
                      "train.json/val.json/test.json next to images/, and set "
                      "--config.data.path to that folder."),
    FgvcDataset("oxford_flowers", "Oxford Flowers", 102, "", "oxford_flowers102:2.1.1",
                {"train": "train", "val": "validation", "test": "test"}, (1020, 1020, 6149)),
    FgvcDataset("stanford_dogs", "Stanford Dogs", 120, "Images", "stanford_dogs:0.2.0",
                {"train": "train[:10800]", "val": "train[10800:]", "test": "test"},
                (10800, 1200, 8580)),
    # VPT's Cars JSON paths are car_ims/000001.jpg (the original Stanford
    # layout, not Kaggle's; KMnP/vpt #44).
    FgvcDataset("stanford_cars", "Stanford Cars", 196, "", "cars196:2.1.0",
                {"train": "train[:7329]", "val": "train[7329:]", "test": "test"},
                (7329, 815, 8041)),
)}

ALIASES = {"cub200": "cub", "cub_200_2011": "cub", "caltech_birds2011": "cub",
           "flowers": "oxford_flowers", "oxfordflowers": "oxford_flowers",
           "dogs": "stanford_dogs", "stanforddogs": "stanford_dogs",
           "cars": "stanford_cars", "stanfordcars": "stanford_cars", "cars196": "stanford_cars"}


def get_dataset(name: str) -> FgvcDataset:
  """A dataset by name or alias (case-insensitive)."""
  key = ALIASES.get(name.lower(), name.lower())
  if key not in DATASETS:
    raise errors.unknown_name("FGVC dataset", name, DATASETS, ALIASES, matched=key,
                              choices=f"choose one of {', '.join(DATASETS)}")
  return DATASETS[key]
