"""Many tasks on one backbone: classify a batch whose examples name their tasks.

A ``MultiTaskServer`` loads one backbone file and K task exports (``task_export``).
The backbone's weights are held once; each export adds only what its task
trained (prompts, head, adapters, ...). Exports of one structure share one
stacked tree and one jitted forward (``task_stacking``); exports the server
cannot share a backbone with are refused with a message naming the task
(``served_exports``). Each task's images are normalised with its own mean and
std from task.json.

Output format (``MultiTaskServer.logits``): float32 (B, C_max), C_max the
largest class count among the server's tasks. Row i holds example i's logits
in columns [0, C_task) and -inf beyond, so ``softmax``/``argmax`` over a whole
row are those of the example's own task; ``num_classes(task)`` gives C_task for
slicing.

Memory: the backbone's parameters once, plus the stacked task variables: the
exports with each head padded to its group's largest class count (for the 19
VTAB-1k tasks, 2 to 397 classes, on ViT-B/16 the padding adds about 20 MB to
the exports' 38 MB). Per call, each example's task variables are gathered
(VPT-deep, 50 prompts on ViT-B: 1.8 MB per example).

Written and tested for the ViT family (``vit.VisionTransformer``); the vmap
formulation does not depend on it, but a model whose backbone keeps variables
outside ``params`` (BatchNorm statistics) is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from vpt_jax import errors
from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.export import predict as predict_lib
from vpt_jax.export import served_exports
from vpt_jax.export import task_stacking
from vpt_jax.methods import factory


def _nbytes(tree) -> int:
  return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def _next_power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class MultiTaskServer:
  """One backbone and K task exports; classifies batches of mixed tasks.

  >>> server = MultiTaskServer({"cifar": "/exports/cifar", "dtd": "/exports/dtd"})
  >>> logits = server.logits(images, ["dtd", "cifar", ...])   # (B, C_max), -inf padded

  Args:
    exports: {task name: export directory}.
    backbone_path: the backbone file; defaults to the path the exports recorded
      (they must all record the same fingerprint).

  Raises:
    ExportError: a task that cannot be served (see ``served_exports``).
    ValueError: no tasks, or bad task names.
  """

  def __init__(self, exports: Mapping[str, str], backbone_path: Optional[str] = None):
    served_exports.check_task_names(exports)
    loaded = [served_exports.read_task(name, directory) for name, directory in exports.items()]
    for export in loaded:
      served_exports.check_servable(export)
    served_exports.check_same(
        loaded, "image_size", lambda e: e.metadata["image_size"],
        "one input array per batch; serve each image size with its own server")
    served_exports.check_same(loaded, "backbone variant",
                              lambda e: e.metadata["model"]["variant"],
                              "a server holds one backbone")
    self.backbone_path = backbone_path or loaded[0].metadata["backbone"]["path"]
    if not self.backbone_path:
      raise errors.UserError(f"task {loaded[0].name!r} records no backbone path; pass the "
                             "backbone file (--backbone)")
    self.backbone_fingerprint = npz_lib.fingerprint(self.backbone_path)
    served_exports.check_backbone_fingerprints(loaded, self.backbone_path,
                                               self.backbone_fingerprint)
    self.image_size = int(loaded[0].metadata["image_size"])
    self.export_bytes = sum(_nbytes(e.variables) for e in loaded)

    variant = loaded[0].metadata["model"]["variant"]
    backbone_arrays, backbone_source = factory.read_backbone_file(self.backbone_path, variant)
    self._shared_cache: dict[str, jax.Array] = {}
    self.groups = [
        task_stacking.build_task_group(members, backbone_arrays, backbone_source=backbone_source,
                                       image_size=self.image_size,
                                       shared_cache=self._shared_cache)
        for members in task_stacking.group_by_structure(loaded)]
    del backbone_arrays  # only the device copies of the leaves the models read stay
    # The stacked device copies replace the host arrays as read.
    self.tasks = {e.name: dataclasses.replace(e, variables={}) for e in loaded}
    # task name -> (group number, row in the group's stacked variables)
    self._where = {name: (g, group.task_names.index(name))
                   for g, group in enumerate(self.groups) for name in group.task_names}
    self.max_classes = max(e.num_classes for e in loaded)

  def num_classes(self, task: str) -> int:
    """The class count of ``task``."""
    return self.tasks[self._check_task(task)].num_classes

  def location(self, task: str) -> tuple[int, int]:
    """(group number, row in the group's stacked variables) of ``task``."""
    return self._where[self._check_task(task)]

  @property
  def backbone_leaves(self) -> dict[str, jax.Array]:
    """{"params/<path>": device array}: the backbone leaves the groups read, once each."""
    return dict(self._shared_cache)

  def _check_task(self, task: str) -> str:
    if task not in self.tasks:
      raise errors.UserError(f"unknown task {task!r}; this server has {sorted(self.tasks)}")
    return task

  def memory(self) -> dict[str, int]:
    """Bytes held: the backbone once, the task variables as stacked, the exports as read."""
    return {"backbone_bytes": _nbytes(self._shared_cache),
            "task_bytes": sum(_nbytes(g.per_task) for g in self.groups),
            "export_bytes": self.export_bytes}

  def logits(self, images, tasks: Sequence[str]) -> np.ndarray:
    """Classifies a batch of mixed tasks.

    Args:
      images: (B, image_size, image_size, 3) pixel values in [0, 255], e.g. uint8.
      tasks: B task names, one per example.

    Returns:
      float32 (B, max_classes); row i is example i's logits for its task's
      classes, -inf beyond them. One forward pass per structure group present.
      When several groups are present, each group's examples are padded to the
      next power of two (so at most log2(B) + 1 shapes compile per group).
    """
    images = np.asarray(images)
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise errors.UserError(f"images must be (B, {self.image_size}, {self.image_size}, 3) pixel "
                             f"arrays (resize to the tasks' image size), got {images.shape}")
    if len(tasks) != images.shape[0]:
      raise errors.UserError(f"{images.shape[0]} images but {len(tasks)} task names; give one "
                             "task per image")
    where = [self._where[self._check_task(t)] for t in tasks]
    output = np.full((len(tasks), self.max_classes), -np.inf, np.float32)
    present = sorted({g for g, _ in where})
    for g in present:
      examples = np.asarray([i for i, (group, _) in enumerate(where) if group == g])
      rows = np.asarray([where[i][1] for i in examples], np.int32)
      group_images = images[examples]
      if len(present) > 1:
        size = _next_power_of_two(len(examples))
        rows = np.pad(rows, (0, size - len(rows)))
        group_images = np.pad(group_images, [(0, size - len(examples))] + [(0, 0)] * 3)
      logits = np.asarray(self.groups[g].logits(group_images, rows))
      output[examples, :logits.shape[1]] = logits[:len(examples)]
    return output

  def classify_files(self, inputs: Sequence[tuple[str, str]], *, top_k: int = 5,
                     batch_size: int = 32) -> list[dict]:
    """Classifies image files, each with its task.

    Args:
      inputs: (task name, image path) pairs.

    Returns:
      One dict per input, in order: {"task", "file", "class" (the top class
      name), "probability" (its probability), "classes": [[name, probability],
      ...] (the top ``top_k``)}.
    """
    for task, _ in inputs:
      self._check_task(task)
    results = []
    for start in range(0, len(inputs), batch_size):
      chunk = inputs[start:start + batch_size]
      images = predict_lib.read_images([path for _, path in chunk], self.image_size)
      tasks = [task for task, _ in chunk]
      probabilities = np.asarray(jax.nn.softmax(self.logits(images, tasks), axis=-1))
      for (task, path), probs in zip(chunk, probabilities):
        names = self.tasks[task].class_names
        results.append({"task": task, "file": path,
                        **predict_lib.top_classes(probs[:len(names)], names, top_k)})
    return results
