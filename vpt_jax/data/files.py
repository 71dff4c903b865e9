"""Image files on disk as pipeline sources: lists, VPT JSON splits, class folders.

Three layouts people already have, all read into the same
{"image": uint8 (H, W, 3), "label": int32} elements as the TFDS sources:

* the extracted VTAB-1k folder that NOAH, SSF, CVPT and others distribute: image
  files plus ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and
  ``test.txt``, one "relative/path label" per line (``list_folder``);
* VPT's FGVC split files ``{train,val,test}.json``, each a
  ``{relative_path: class_id}`` object (``vpt_json_folder``);
* any folder with one sub-folder per class, optionally below split folders
  (``root/<split>/<class>/*``) (``image_folder``).

A split string names lists (or JSON files, or split folders) with TFDS
syntax: "train800val200", "train[:80%]", "train+val", "all[-100:]".

Files are decoded in parallel with tf.data. An unreadable file stops the run
with an error that names it, unless ``skip_corrupt`` is set: then it is
skipped, named on stderr, and the count is reported at the end of the pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from vpt_jax import errors

# What the file sources' pipeline asserts on a file it cannot read or decode.
CORRUPT_IMAGE = "cannot read or decode image"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
LIST_SPLITS = ("train800", "val200", "train800val200", "test")
_SPLIT_ITEM = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


# ----------------------------------------------------------------- split strings

def _boundary(text: Optional[str], size: int) -> Optional[int]:
  if text is None:
    return None
  if text.endswith("%"):
    # TFDS's default "closest" rounding of percent boundaries.
    return int(round(int(text[:-1]) * size / 100.0))
  return int(text)


def select(split: str, sizes: Mapping[str, int]) -> list[tuple[str, int, int]]:
  """Parses a TFDS-style split string against named parts of known sizes.

  Args:
    split: e.g. "train800val200", "train[:80%]+val", "all[-100:]".
    sizes: {part name: number of examples}.

  Returns:
    [(part, start, stop)] with absolute, clipped indices, in order.
  """
  ranges = []
  for item in split.replace(" ", "").split("+"):
    match = _SPLIT_ITEM.match(item)
    if not match:
      raise errors.UserError(f"Cannot parse split {item!r} of {split!r}; write NAME, "
                             "NAME[start:stop] or NAME[a%:b%], joined by '+'")
    name = match["name"]
    if name not in sizes:
      raise errors.UserError(f"Unknown split {name!r} in {split!r}; this data has "
                             f"{', '.join(sorted(sizes))}")
    size = sizes[name]
    start, stop, _ = slice(_boundary(match["start"], size),
                           _boundary(match["stop"], size)).indices(size)
    ranges.append((name, start, max(start, stop)))
  return ranges


# ----------------------------------------------------------------- the source

def _read_and_decode(index, path, label):
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  return {"image": image, "label": label, "index": index}


@dataclasses.dataclass(frozen=True, eq=False)
class FileSource:
  """Labelled image files, in a fixed order; implements source_protocols.ExampleSource.

  Attributes:
    builder: what the data is, for messages (e.g. "image folder /data/pets").
    split: the split string this source was selected with.
    paths: (N,) absolute file paths.
    labels: int32 (N,).
    classes: the number of classes.
    names: class names, or None.
    skip_corrupt: skip unreadable files (counted) instead of failing.
  """
  builder: str
  split: str
  paths: np.ndarray
  labels: np.ndarray
  classes: int
  names: Optional[tuple[str, ...]] = None
  skip_corrupt: bool = False

  def _share(self, process_index: int, process_count: int) -> np.ndarray:
    """Row indices of this process's share (sizes differ by at most one)."""
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return np.array_split(np.arange(len(self.paths)), process_count)[process_index]

  def size(self, process_index: int = 0, process_count: int = 1) -> int:
    return len(self._share(process_index, process_count))

  def num_classes(self) -> int:
    return self.classes

  def class_names(self) -> Optional[list[str]]:
    return list(self.names) if self.names else None

  def examples(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """{"image": uint8 (H, W, 3), "label": int32} of this share, in order."""
    rows = self._share(process_index, process_count)
    paths = tf.constant(self.paths[rows])
    count = len(rows)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.range(count, dtype=tf.int64), paths, self.labels[rows]))
    # A failed read or decode cannot be caught inside tf.data, and its error
    # does not name the file. So drop failures, find them as gaps in the
    # element index (a sentinel closes the last gap) and fail, or report, there.
    ds = ds.map(_read_and_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().concatenate(tf.data.Dataset.from_tensors(
        {"image": tf.zeros([1, 1, 3], tf.uint8), "label": tf.constant(-1, tf.int32),
         "index": tf.constant(count, tf.int64)}))
    builder, split, skip = self.builder, self.split, self.skip_corrupt

    def check(state, example):
      expected, skipped = state
      missing = example["index"] - expected
      names = tf.strings.reduce_join(paths[expected:example["index"]], separator=", ")
      if not skip:
        tf.debugging.Assert(tf.equal(missing, 0), [
            CORRUPT_IMAGE, names, f"in {builder}. Replace or delete the "
            "file, or set --config.data.skip_corrupt=true to skip unreadable images "
            "(their number is reported)."], summarize=1)
      else:
        if missing > 0:
          tf.print("warning: skipping unreadable image(s)", names, output_stream=sys.stderr)
        skipped += missing
        if example["index"] == count and skipped > 0:
          tf.print("warning: skipped", skipped, f"unreadable image(s) of {count} in "
                   f"{builder} split {split!r}", output_stream=sys.stderr)
      return (example["index"] + 1, skipped), example

    ds = ds.scan((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), check)
    ds = ds.filter(lambda example: example["index"] < count)
    return ds.map(lambda example: {"image": example["image"], "label": example["label"]})


def numpy_batches(dataset: tf.data.Dataset) -> Iterator:
  """``dataset.as_numpy_iterator()``; an unreadable image file is a UserError naming it.

  The file sources stop on such a file with a tf.debugging.Assert inside the
  pipeline (see ``FileSource.dataset``), which TensorFlow raises as an
  InvalidArgumentError with its graph node attached; this is its one line.
  """
  iterator = dataset.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      if CORRUPT_IMAGE not in e.message:
        raise
      parts = re.findall(r"\[([^\[\]]*)\]", e.message.splitlines()[0])
      raise errors.UserError(" ".join(parts) or e.message.splitlines()[0]) from e
    yield batch


def _names(split: str, available: Mapping[str, object]) -> set[str]:
  """The part names a split string uses (checked against those available)."""
  return {name for name, _, _ in select(split, {k: 0 for k in available})}


def _source(builder: str, split: str, parts: Mapping[str, Sequence[tuple[str, int]]],
            classes: int, names=None, skip_corrupt: bool = False) -> FileSource:
  """A FileSource over the rows of ``parts`` that ``split`` selects."""
  rows = []
  for name, start, stop in select(split, {k: len(v) for k, v in parts.items()}):
    rows.extend(parts[name][start:stop])
  return labelled_files(builder, split, rows, classes, names, skip_corrupt)


def labelled_files(builder: str, split: str, rows: Sequence[tuple[str, int]], classes: int,
                   names=None, skip_corrupt: bool = False) -> FileSource:
  """A FileSource over [(path, label)] rows; refuses no rows or a label outside the classes."""
  if not rows:
    raise errors.UserError(f"split {split!r} of {builder} selects no images")
  paths = np.array([path for path, _ in rows])
  labels = np.array([label for _, label in rows], np.int32)
  bad = (labels < 0) | (labels >= classes)
  if bad.any():
    i = int(np.argmax(bad))
    raise errors.UserError(f"{builder}: label {labels[i]} of {paths[i]} is outside [0, {classes}); "
                     "fix the label or set --config.data.num_classes")
  return FileSource(builder, split, paths, labels, classes,
                    tuple(names) if names else None, skip_corrupt)


# ----------------------------------------------------------------- VTAB-1k lists

def read_list(path: str, root: str) -> list[tuple[str, int]]:
  """A "relative/path label" list file -> [(absolute path, label)]."""
  rows = []
  with tf.io.gfile.GFile(path) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      relative, _, label = line.rpartition(" ")
      if not relative or not label.lstrip("-").isdigit():
        raise errors.UserError(f"{path}:{number}: expected 'relative/path label', got {line!r}")
      rows.append((os.path.join(root, relative), int(label)))
  return rows


def list_folder(root: str, split: str, *, num_classes: int, skip_corrupt: bool = False,
                names=None) -> FileSource:
  """The extracted VTAB-1k layout: ``root/<split>.txt`` lists of "path label".

  Paths in the lists are relative to ``root``. ``num_classes`` must come from
  the task, not from the 1k examples (val200 misses classes).
  """
  available = {os.path.basename(p)[:-4]: p
               for p in tf.io.gfile.glob(os.path.join(root, "*.txt"))}
  if not available:
    raise errors.MissingInputError(
        f"{root} holds no split lists; the VTAB-1k folder format needs "
        f"{', '.join(s + '.txt' for s in LIST_SPLITS)} with 'relative/path label' lines")
  wanted = _names(split, available)
  parts = {name: read_list(available[name], root) for name in wanted}
  _check_union(parts, available, root)
  return _source(f"VTAB-1k folder {root}", split, parts, num_classes, names, skip_corrupt)


def _check_union(parts, available, root) -> None:
  """train800val200 must be train800 + val200: packages with broken lists exist."""
  if "train800val200" in parts and {"train800", "val200"} <= set(available):
    union = sorted(read_list(available["train800"], root)
                   + read_list(available["val200"], root))
    if union != sorted(parts["train800val200"]):
      print(f"warning: {root}/train800val200.txt is not train800.txt + val200.txt; "
            "check the package (labels or files differ)", file=sys.stderr)


# ----------------------------------------------------------------- VPT JSON splits

def read_json_split(path: str) -> list[tuple[str, int]]:
  """A VPT split file {relative_path: class_id} -> [(relative_path, id)] in file order."""
  with tf.io.gfile.GFile(path) as f:
    annotations = json.load(f)
  if not isinstance(annotations, dict):
    raise errors.UserError(f"{path}: expected a JSON object {{relative_path: class_id}}")
  return [(rel, int(label)) for rel, label in annotations.items()]


def vpt_json_folder(root: str, split: str, *, image_dir: str = "", num_classes: int = 0,
                    skip_corrupt: bool = False) -> FileSource:
  """VPT's FGVC layout: ``root/<split>.json`` and images under root/image_dir.

  Class ids are remapped to 0..K-1 by sorting a split file's unique ids, as
  the reference (json_dataset.py) does per split. That is the same mapping for
  every split when each split file holds every class; when one does not, the
  reference would shift that split's labels, so the ids of all the split files
  together are used instead (with a warning).
  """
  files = {os.path.basename(p)[:-5]: p for p in tf.io.gfile.glob(os.path.join(root, "*.json"))}
  if not files:
    raise errors.MissingInputError(
        f"{root} holds no VPT split files; expected train.json, val.json and test.json, "
        "each {\"relative/path.jpg\": class_id} (from the VPT authors' release)")
  wanted = _names(split, files)
  annotations = {name: read_json_split(path) for name, path in files.items()}
  all_ids = sorted({label for rows in annotations.values() for _, label in rows})
  for name in sorted(wanted):
    ids = sorted({label for _, label in annotations[name]})
    if ids != all_ids:
      print(f"warning: {files[name]} holds {len(ids)} of the {len(all_ids)} class ids; "
            "mapping ids over all split files (the reference's per-split mapping would "
            "shift this split's labels)", file=sys.stderr)
  mapping = {label: i for i, label in enumerate(all_ids)}
  base = os.path.join(root, image_dir)
  parts = {name: [(os.path.join(base, rel), mapping[label]) for rel, label in annotations[name]]
           for name in wanted}
  classes = num_classes or len(all_ids)
  return _source(f"VPT JSON splits {root}", split, parts, classes, None, skip_corrupt)


# ----------------------------------------------------------------- class folders

def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _subdirs(path: str) -> list[str]:
  return sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                if tf.io.gfile.isdir(os.path.join(path, d)) and not d.startswith("."))


def _hashed_order(root: str, files: list[str]) -> list[str]:
  """Files ordered by a hash of their path below root: a fixed shuffle that
  mixes classes (so "all[:80%]" is a random share) and does not move when
  files are added elsewhere."""
  key = lambda p: hashlib.md5(os.path.relpath(p, root).encode()).hexdigest()
  return sorted(files, key=key)


def _split_dirs(root: str) -> dict[str, str]:
  """{split name: folder} of an image folder: its split sub-folders, or {"all": root}."""
  if not tf.io.gfile.isdir(root):
    what = "is a file, not a folder" if tf.io.gfile.exists(root) else "does not exist"
    raise errors.MissingInputError(f"image folder {root} {what}; set --config.data.path to a "
                                   "folder with one sub-folder per class")
  top = _subdirs(root)
  # Split layout: the top folders hold only folders (the classes).
  split_layout = bool(top) and all(
      _subdirs(os.path.join(root, d))
      and not any(_is_image(f) for f in tf.io.gfile.listdir(os.path.join(root, d)))
      for d in top)
  return {d: os.path.join(root, d) for d in top} if split_layout else {"all": root}


# A flat class folder's held-out share: the last 20% of the fixed hashed order.
FLAT_FOLDER_SPLITS = {"train_split": "all[:80%]", "eval_split": "", "test_split": "all[80%:]"}


def folder_splits(root: str) -> dict[str, str]:
  """The train, eval and test splits an image folder's layout implies.

  ``root/train/``, ``root/val/`` (or ``validation/``) and ``root/test/`` are
  used as found (a missing one is "" = none; no ``train/`` keeps "train" so
  the refusal names it); a flat class folder is split 80/20 into train and
  test (``FLAT_FOLDER_SPLITS``).
  """
  found = _split_dirs(root)
  if set(found) == {"all"}:
    return dict(FLAT_FOLDER_SPLITS)
  val = next((name for name in ("val", "validation") if name in found), "")
  return {"train_split": "train", "eval_split": val,
          "test_split": "test" if "test" in found else ""}


def image_folder(root: str, split: str, *, num_classes: int = 0,
                 skip_corrupt: bool = False) -> FileSource:
  """A folder with one sub-folder per class, optionally below split folders.

  Layouts: ``root/<class>/<image>`` (one split, named "all") or
  ``root/<split>/<class>/<image>`` (splits named after their folders). Class
  ids are the sorted class-folder names over all splits, so every split agrees.
  Images (.jpg, .jpeg, .png, .bmp, .gif) are ordered by a hash of their path.
  """
  split_dirs = _split_dirs(root)
  classes = sorted({c for path in split_dirs.values() for c in _subdirs(path)})
  if not classes:
    raise errors.MissingInputError(f"{root} has no class sub-folders; expected root/<class>/*.jpg "
                                   "or root/<split>/<class>/*.jpg")
  index = {name: i for i, name in enumerate(classes)}
  wanted = _names(split, split_dirs)
  parts = {}
  for name in wanted:
    files = []
    for cls in _subdirs(split_dirs[name]):
      folder = os.path.join(split_dirs[name], cls)
      files.extend(os.path.join(folder, f) for f in tf.io.gfile.listdir(folder) if _is_image(f))
    labels = {path: index[os.path.basename(os.path.dirname(path))] for path in files}
    parts[name] = [(path, labels[path]) for path in _hashed_order(root, files)]
  if num_classes and num_classes != len(classes):
    raise errors.UserError(f"{root} has {len(classes)} class folders but data.num_classes is "
                           f"{num_classes}; set --config.data.num_classes={len(classes)} or 0")
  return _source(f"image folder {root}", split, parts, len(classes), classes, skip_corrupt)
