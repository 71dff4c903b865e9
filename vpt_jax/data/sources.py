"""From ``config.data`` to a pipeline source: TFDS, VTAB/FGVC tasks, files.

``config.data.task`` selects what to read:

=====================  ==========================================================
``""``                 the TFDS dataset ``data.builder`` (``image_key``, ``label_key``)
``"vtab/<task>"``      one of the 19 VTAB-1k tasks (``vtab_tasks.TASKS``) through TFDS,
                       or, with ``data.path``, the extracted VTAB-1k folder
``"fgvc/<dataset>"``   CUB, NABirds, Oxford Flowers, Stanford Dogs or Cars through
                       TFDS, or, with ``data.path``, VPT's JSON split files
``"folder"``           ``data.path/<class>/*`` or ``data.path/<split>/<class>/*``
``"list"``             ``data.path/<split>.txt`` lists ("relative/path label")
``"json"``             ``data.path/<split>.json`` ({relative_path: class_id})
``"fewshot/<dataset>"``  NOAH's few-shot datasets, ``data.shots`` per class, draw
                       ``data.shots_seed``: NOAH's lists with ``data.path``, else
                       drawn from TFDS (``few_shot``)
=====================  ==========================================================

Every source yields the same {"image": uint8, "label": int32} elements.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import tensorflow as tf
import tensorflow_datasets as tfds

from vpt_jax import errors
from vpt_jax.data import fgvc
from vpt_jax.data import few_shot
from vpt_jax.data import files
from vpt_jax.data import preprocessing
from vpt_jax.data import source_protocols
from vpt_jax.data import vtab
from vpt_jax.data import vtab_labels
from vpt_jax.data import vtab_tasks

TASK_KINDS = ("vtab", "fgvc", "folder", "list", "json", "fewshot")


@dataclasses.dataclass(frozen=True)
class TfdsTaskSource:
  """A TFDS split read through a task's preprocess (label) function.

  Implements source_protocols.ExampleSource.

  Attributes:
    builder: TFDS name[/config]:version.
    split: TFDS split string.
    data_dir: TFDS data_dir (None: the TFDS default).
    preprocess: raw example -> {"image": uint8 (H, W, 1 or 3), "label": int32}.
    classes: number of classes (from the task, not the data).
    names: class names; None takes the ClassLabel ``label_key``'s names.
    label_key: see ``names``.
    missing_message: the error when the dataset is not prepared.
  """
  builder: str
  split: str
  data_dir: Optional[str]
  preprocess: Callable
  classes: int
  names: Optional[tuple[str, ...]] = None
  label_key: str = "label"
  missing_message: str = ""

  def _prepared(self) -> tfds.core.DatasetBuilder:
    builder = tfds.builder(self.builder, data_dir=self.data_dir)
    if not builder.is_prepared():
      raise errors.MissingInputError(
          self.missing_message
          or f"TFDS dataset {self.builder!r} is not prepared in {builder.data_dir!r}; "
             f"run `tfds build {self.builder}` or set --config.data.data_dir")
    return builder

  def examples(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    split = source_protocols.process_split(self.split, process_index, process_count)
    ds = self._prepared().as_dataset(split=split, shuffle_files=False)
    return ds.map(self.preprocess, num_parallel_calls=tf.data.AUTOTUNE)

  def size(self, process_index: int = 0, process_count: int = 1) -> int:
    split = source_protocols.process_split(self.split, process_index, process_count)
    return self._prepared().info.splits[split].num_examples

  def num_classes(self) -> int:
    return self.classes

  def class_names(self) -> Optional[list[str]]:
    if self.names:
      return list(self.names)
    features = tfds.builder(self.builder, data_dir=self.data_dir).info.features
    feature = features[self.label_key] if self.label_key in features else None
    names = list(getattr(feature, "names", None) or [])
    return None if names == [str(i) for i in range(len(names))] else names or None


def _split_sizes(builder_name: str, data_dir: Optional[str]) -> Optional[dict]:
  """TFDS split sizes of a prepared dataset, or None."""
  builder = tfds.builder(builder_name, data_dir=data_dir)
  if not builder.is_prepared():
    return None
  return {name: info.num_examples for name, info in builder.info.splits.items()} or None


def vtab_source(name: str, split: str, data_dir: Optional[str]) -> TfdsTaskSource:
  """A VTAB-1k task through TFDS; split is a VTAB split name or a TFDS string."""
  task = vtab_tasks.get_task(name)
  tfds_split = vtab.resolve_split(task, split, _split_sizes(task.builder, data_dir))
  return TfdsTaskSource(task.builder, tfds_split, data_dir, task.preprocess,
                        task.num_classes, task.class_names,
                        missing_message=vtab.missing_data_message(task, data_dir))


def _vtab_folder(path: str, task: vtab_tasks.VtabTask) -> str:
  """The task's folder: path itself, or path/<name> under any of its spellings."""
  if tf.io.gfile.glob(os.path.join(path, "*.txt")):
    return path
  spellings = [task.name] + [a for a, target in vtab_tasks.ALIASES.items() if target == task.name]
  for spelling in spellings:
    candidate = os.path.join(path, spelling)
    if tf.io.gfile.glob(os.path.join(candidate, "*.txt")):
      return candidate
  raise errors.MissingInputError(
      f"No VTAB-1k lists for {task.name} in {path}: expected train800.txt, val200.txt, "
      f"train800val200.txt and test.txt in {path} or in {path}/<task> with <task> one of "
      f"{', '.join(spellings)}")


def make_source(data, split: str) -> source_protocols.AnySource:
  """The source of one split described by ``config.data``."""
  task = data.task
  data_dir = data.data_dir or None
  if not task:
    return source_protocols.ImageSource(builder=data.builder, split=split, data_dir=data_dir,
                                        image_key=data.image_key, label_key=data.label_key)
  kind, _, name = task.partition("/")
  if kind == "vtab":
    if data.path:
      vtab_task = vtab_tasks.get_task(name)
      return files.list_folder(_vtab_folder(data.path, vtab_task), split,
                               num_classes=vtab_task.num_classes,
                               skip_corrupt=data.skip_corrupt, names=vtab_task.class_names)
    return vtab_source(name, split, data_dir)
  if kind == "fgvc":
    dataset = fgvc.get_dataset(name)
    if data.path:
      return files.vpt_json_folder(data.path, split, image_dir=dataset.image_dir,
                                   num_classes=dataset.num_classes,
                                   skip_corrupt=data.skip_corrupt)
    if not dataset.tfds_builder:
      raise errors.UserError(f"{dataset.title} has no TFDS builder. {dataset.notes}")
    return TfdsTaskSource(dataset.tfds_builder, dataset.tfds_splits.get(split, split),
                          data_dir, vtab_labels.plain_label, dataset.num_classes)
  if kind == "fewshot":
    return few_shot.make_source(name, split, shots=data.shots, seed=data.shots_seed,
                                path=data.path, data_dir=data_dir,
                                skip_corrupt=data.skip_corrupt)
  if kind == "folder":
    return files.image_folder(data.path, split, num_classes=data.num_classes,
                              skip_corrupt=data.skip_corrupt)
  if kind == "list":
    return files.list_folder(data.path, split, num_classes=data.num_classes,
                             skip_corrupt=data.skip_corrupt)
  if kind == "json":
    return files.vpt_json_folder(data.path, split, num_classes=data.num_classes,
                                 skip_corrupt=data.skip_corrupt)
  raise errors.UserError(f"Unknown data.task {task!r}; use '' (data.builder), vtab/<task>, "
                         "fgvc/<dataset>, folder, list or json")


def check_data_config(data) -> Optional[str]:
  """The problem with ``config.data`` that needs no data to see, or None."""
  if data.preprocess not in preprocessing.PREPROCESS_MODES:
    return (f"Unknown data.preprocess {data.preprocess!r}; choose one of "
            f"{preprocessing.PREPROCESS_MODES}")
  if data.resize not in preprocessing.RESIZE_METHODS:
    return f"Unknown data.resize {data.resize!r}; choose one of {preprocessing.RESIZE_METHODS}"
  if data.num_classes == 1 or data.num_classes < 0:
    return (f"data.num_classes={data.num_classes}: a classifier needs at least 2 classes; "
            "set --config.data.num_classes=0 to take them from the dataset")
  task = data.task
  if not task:
    return None if data.builder else (
        "config.data.builder and config.data.task are both empty; set a TFDS dataset "
        "(--config.data.builder=dmlab:2.0.1) or a task (--config.data.task=vtab/dmlab)")
  kind, _, name = task.partition("/")
  if kind not in TASK_KINDS:
    return (f"Unknown data.task {task!r}; use vtab/<task>, fgvc/<dataset>, "
            "fewshot/<dataset>, folder, list or json")
  try:
    if kind == "vtab":
      vtab_tasks.get_task(name)
    elif kind == "fgvc":
      dataset = fgvc.get_dataset(name)
      if not dataset.tfds_builder and not data.path:
        return f"{dataset.title} has no TFDS builder. {dataset.notes}"
    elif kind == "fewshot":
      dataset = few_shot.get_dataset(name)
      if not dataset.tfds_builder and not data.path:
        return (f"{dataset.title} has no TFDS builder: set --config.data.path to its folder "
                f"with NOAH's annotations/ lists")
      return few_shot.check_shots(data.shots, data.shots_seed)
  except ValueError as e:
    return str(e)
  if kind in ("folder", "list", "json") and not data.path:
    return f"data.task={task!r} reads files: set --config.data.path to the folder"
  if kind == "list" and not data.num_classes:
    return ("data.task='list' needs --config.data.num_classes (the task's classes; the "
            "lists may not show every class)")
  return None


# The config.data fields holding a split string, in the order a run reads them.
SPLIT_FIELDS = ("train_split", "eval_split", "test_split")
# Their defaults (configs/common.py): TFDS split names, which a folder does not have.
DEFAULT_SPLITS = {"train_split": "train[:800]+validation[:200]", "eval_split": "",
                  "test_split": "test"}


def derive_folder_splits(data) -> Optional[str]:
  """For ``data.task=folder`` with the default splits, sets them from the folder's layout.

  Returns the line saying which splits were used, or None when nothing was
  derived (another task, or splits the user set).
  """
  if data.task != "folder" or any(data[f] != DEFAULT_SPLITS[f] for f in SPLIT_FIELDS):
    return None
  splits = files.folder_splits(data.path)
  for field, split in splits.items():
    data[field] = split
  return ("data splits from the folder layout: " + ", ".join(
      f"{field}={split!r}" for field, split in splits.items())
          + " (set --config.data.train_split etc. to choose others)")


def check_data_splits(data) -> Optional[str]:
  """The problem with ``config.data``'s splits and classes, or None.

  Reads only sizes and metadata (no example is decoded), so a split that
  selects nothing, or a one-class task, is refused before the first step
  instead of when the run reaches it. An empty eval or test split string means
  "none" and is skipped; a dataset that is not prepared still raises its own
  error with the fix.
  """
  if not data.train_split:
    return "data.train_split is empty; name the training split (--config.data.train_split=train)"
  for field in SPLIT_FIELDS:
    split = data[field]
    if not split:
      continue
    try:
      count = source_protocols.num_examples(make_source(data, split))
    except (tfds.core.registered.DatasetNotFoundError, errors.MissingInputError):
      # the dataset, not the split, is wrong or missing: its message names the fix
      # (MissingInputError is a ValueError, which the split clause below would reword)
      raise
    except KeyError as e:  # no such image or label feature: the message names the fix
      return e.args[0]
    except ValueError as e:  # TFDS: unknown split, bad slice; a file source's split
      reason = " ".join(str(e).split())  # one line: TFDS's messages span several
      return (f"data.{field}={split!r} is not a split of {_dataset_name(data)} ({reason}); "
              f"fix --config.data.{field}")
    if count <= 0:  # TFDS counts an inverted slice (test[5:3]) as negative
      return (f"data.{field}={split!r} selects no examples of {_dataset_name(data)}; "
              f"fix --config.data.{field}")
  try:
    classes = data.num_classes or source_protocols.num_classes(
        make_source(data, data.train_split))
  except TypeError as e:  # the label is not a class label: the message names the fix
    return e.args[0]
  if classes < 2:
    return (f"{_dataset_name(data)} (label {data.label_key!r}) has {classes} class(es); a "
            "classifier needs at least 2: choose another label (--config.data.label_key) "
            "or dataset")
  return None


def _dataset_name(data) -> str:
  return data.task or data.builder
