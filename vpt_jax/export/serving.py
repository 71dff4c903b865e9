"""Many tasks on one backbone: classify a batch whose examples name their tasks.

A ``MultiTaskServer`` loads one backbone file and K task exports (``task_export``).
The backbone's weights are held once; each export adds only what its task
trained (prompts, head, adapters, ...). Per-task variables are stacked on a
leading task axis; the jitted forward gathers, for every example, its task's
row and runs ``model.apply`` under ``jax.vmap`` over the examples with the
backbone broadcast (``in_axes=None``), so XLA folds the example axis into the
backbone's matmuls: one forward pass for the whole batch, no per-example loop.

Which tasks share a forward pass (a "group"): exports whose models have the
same structure, i.e. the same model spec (method, variant, image size, prompt
count, method settings, ...; training-only dropout rates ignored) and the same
exported leaves. Tasks of different structure (say VPT-deep with 10 and with 50
prompts, or VPT and LoRA) cannot share one stacked tree, so a mixed batch runs
one forward per group, each on its examples only.

Output format (``MultiTaskServer.logits``): float32 (B, C_max), C_max the
largest class count among the server's tasks. Row i holds example i's logits
in columns [0, C_task) and -inf beyond, so ``softmax``/``argmax`` over a whole
row are those of the example's own task; ``num_classes(task)`` gives C_task for
slicing. Heads are zero-padded to their group's largest class count inside the
forward, and the padded columns are masked.

Refused, with a message naming the task:
* an export recorded with another backbone fingerprint than the served file,
  or trained without a backbone file (its frozen weights are random);
* an export that trained backbone weights other than biases (full,
  partial-k): sharing one copy of the backbone is the point; serve those
  alone (``predict.predict_files``). Exports that override only backbone
  biases (bias: BitFit, vpt+bias) are served: their biases become per-task
  leaves, gathered per example like prompts (about 0.4 MB per example for
  ViT-B/16's 103K biases);
* tasks of different image sizes or backbone variants in one server (one
  input array, one backbone): use one server per image size.
Each task's images are normalised with its own mean and std from task.json.

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
import functools
import json
import re
from typing import Any, Mapping, Optional, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.params import trees
from vpt_jax.export import predict as predict_lib
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.methods import registry

ExportError = task_export.ExportError
PARAMS = "params"
BATCH_STATS = "batch_stats"
# The head's output layer: the only per-task leaves whose shape depends on the
# class count (padded to the group's largest).
HEAD_KERNEL = "params/head/kernel"
HEAD_BIAS = "params/head/bias"
# Spec fields that act only while training: tasks differing only in these share
# a structure (dropout is off at inference; remat changes only the backward pass).
TRAINING_ONLY_FIELDS = ("dropout_rate", "prompt_dropout", "remat")
TRAINING_ONLY_SETTINGS = ("dropout", "drop_path")


@dataclasses.dataclass(frozen=True)
class LoadedExport:
  """One export as read from disk: metadata and its variables.

  ``variables`` is flat, keyed "<collection>/<path>" ("params/vpt/deep",
  "batch_stats/head/batchnorm_0/mean").
  """
  name: str
  directory: str
  metadata: dict
  variables: dict[str, np.ndarray]

  @property
  def num_classes(self) -> int:
    return int(self.metadata["num_classes"])

  @property
  def class_names(self) -> list[str]:
    return task_export.class_names(self.metadata)


def read_task(name: str, directory: str) -> LoadedExport:
  """Reads an export (``task_export.read_export``) into a ``LoadedExport``."""
  metadata, flat = task_export.read_export(directory)
  params, stats = task_export.split_batch_stats(flat)
  variables = {**{f"{PARAMS}/{k}": v for k, v in params.items()},
               **{f"{BATCH_STATS}/{k}": v for k, v in stats.items()}}
  return LoadedExport(name, directory, metadata, variables)


def backbone_overrides(export: LoadedExport) -> list[str]:
  """Exported parameters that replace backbone-file parameters (sorted paths).

  A method's own parameters (``Method.fresh_patterns``: head, prompts,
  adapters, ...) are never in the backbone file; anything else it exported was
  a backbone weight it trained (bias vectors for BitFit, blocks for partial-k).
  """
  method = registry.get_method(export.metadata["model"]["method"])
  fresh = [re.compile(p) for p in method.fresh_patterns]
  prefix = f"{PARAMS}/"
  return sorted(k[len(prefix):] for k in export.variables if k.startswith(prefix)
                and not any(p.fullmatch(k[len(prefix):]) for p in fresh))


def check_servable(export: LoadedExport) -> None:
  """Raises ExportError if the export cannot share a backbone with other tasks."""
  recorded = export.metadata["backbone"]
  if recorded["sha256"] is None:
    raise ExportError(
        f"task {export.name!r} ({export.directory}) was trained without a backbone file, "
        "so its frozen weights are its own random initialisation and there is no shared "
        "backbone to serve it on; classify with it alone (predict.predict_files)")
  weights = [p for p in backbone_overrides(export) if p.rsplit("/", 1)[-1] != "bias"]
  if weights:
    raise ExportError(
        f"task {export.name!r} ({export.directory}, method "
        f"{export.metadata['model']['method']!r}) trained backbone weights such as "
        f"{weights[0]} ({len(weights)} weights besides biases); a multi-task server holds "
        "one copy of the backbone for every task, so it serves only methods that add "
        "parameters or override backbone biases. Classify with this task alone "
        "(run.py --mode=predict --config.predict.export_dir=... or predict.predict_files)")


def structure_key(export: LoadedExport) -> str:
  """A string equal for exports that can share one stacked tree and forward.

  The model spec without training-only fields, plus every exported leaf's
  path and shape, except the head output layer's class axis.
  """
  spec = {k: v for k, v in export.metadata["model"].items() if k not in TRAINING_ONLY_FIELDS}
  for key, value in spec.items():
    if isinstance(value, dict):
      spec[key] = {k: v for k, v in value.items() if k not in TRAINING_ONLY_SETTINGS}
  leaves = []
  for path, value in sorted(export.variables.items()):
    shape = list(value.shape)
    if path in (HEAD_KERNEL, HEAD_BIAS):
      shape = shape[:-1]  # the class axis is padded
    leaves.append([path, shape])
  return json.dumps({"model": spec, "leaves": leaves}, sort_keys=True)


def _padded(path: str, value: np.ndarray, num_classes: int) -> np.ndarray:
  """Zero-pads the head output layer's class axis (last) to ``num_classes``."""
  if path not in (HEAD_KERNEL, HEAD_BIAS):
    return value
  widths = [(0, 0)] * (value.ndim - 1) + [(0, num_classes - value.shape[-1])]
  return np.pad(value, widths)


def stack_task_variables(exports: Sequence[LoadedExport], num_classes: int) -> dict:
  """Stacks same-structure exports: {path: (K, ...)}, heads padded to ``num_classes``.

  Raises:
    ExportError: the exports do not hold the same leaves and shapes.
  """
  first = exports[0]
  first_key = structure_key(first)
  for export in exports[1:]:
    if structure_key(export) != first_key:
      raise ExportError(f"tasks {first.name!r} and {export.name!r} differ in structure; "
                        "group them with structure_key first")
  return {path: np.stack([_padded(path, np.asarray(e.variables[path]), num_classes)
                          for e in exports])
          for path in sorted(first.variables)}


def mixed_task_logits(model: nn.Module, shared: Mapping[str, Any],
                      per_task: Mapping[str, Any], mean, std, num_classes, images,
                      task_index):
  """One forward pass over examples of different tasks of one structure.

  Args:
    model: the group's Linen module, built with the group's largest class count C.
    shared: flat {"<collection>/<path>": array} variables all tasks read (the backbone).
    per_task: flat {"<collection>/<path>": (K, ...)} stacked task variables.
    mean, std: (K, 3) each task's input normalisation.
    num_classes: (K,) int32, each task's class count (<= C).
    images: (B, H, W, 3) pixel values in [0, 255] (uint8 or float).
    task_index: (B,) int32, each example's row in the stacked task variables.

  Returns:
    float32 logits (B, C); columns at or beyond an example's class count are -inf.
  """
  own = jax.tree.map(lambda leaf: leaf[task_index], dict(per_task))

  def one_example(task_variables, image, image_mean, image_std):
    variables = trees.unflatten({**shared, **task_variables})
    inputs = normalization_lib.normalize_images(image[None], image_mean, image_std)
    return model.apply(variables, inputs)[0]

  # The backbone is closed over, i.e. broadcast: vmap batches the example axis
  # into its matmuls instead of copying its weights per example.
  logits = jax.vmap(one_example)(own, images, mean[task_index], std[task_index])
  valid = jnp.arange(logits.shape[-1]) < num_classes[task_index][:, None]
  return jnp.where(valid, logits.astype(jnp.float32), -jnp.inf)


@dataclasses.dataclass
class TaskGroup:
  """Tasks of one structure: one model, stacked task variables, one jitted forward.

  Attributes:
    model: built with the group's largest class count.
    task_names: the tasks, in the order of the stacked rows.
    shared: flat backbone variables (device arrays shared with other groups).
    per_task: flat stacked task variables (K_g, ...), heads padded.
    mean, std: (K_g, 3); num_classes: (K_g,) int32.
  """
  model: nn.Module
  task_names: tuple[str, ...]
  shared: dict
  per_task: dict
  mean: jax.Array
  std: jax.Array
  num_classes: jax.Array

  def __post_init__(self):
    self._forward = jax.jit(functools.partial(mixed_task_logits, self.model))

  @property
  def max_classes(self) -> int:
    return int(self.model.num_classes)

  def _arguments(self, images, task_index) -> tuple:
    return (self.shared, self.per_task, self.mean, self.std, self.num_classes, images,
            jnp.asarray(task_index, jnp.int32))

  def logits(self, images, task_index) -> jax.Array:
    """(B, H, W, 3) images and (B,) rows of this group -> (B, C_group) logits."""
    return self._forward(*self._arguments(images, task_index))

  def lower(self, images, task_index):
    """The jitted forward lowered for these inputs (to inspect its HLO)."""
    return self._forward.lower(*self._arguments(images, task_index))


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
    ExportError: a task that cannot be served (see the module docstring).
    ValueError: no tasks, or bad task names.
  """

  def __init__(self, exports: Mapping[str, str], backbone_path: Optional[str] = None):
    if not exports:
      raise ValueError("a MultiTaskServer needs at least one task export: {name: directory}")
    for name in exports:
      if not name or any(c in name for c in ",=:"):
        raise ValueError(f"task name {name!r} must be non-empty without ',', '=' or ':'")
    loaded = [read_task(name, directory) for name, directory in exports.items()]
    for export in loaded:
      check_servable(export)
    self._check_same(loaded, "image_size", lambda e: e.metadata["image_size"],
                     "one input array per batch; serve each image size with its own server")
    self._check_same(loaded, "backbone variant", lambda e: e.metadata["model"]["variant"],
                     "a server holds one backbone")
    self.backbone_path = backbone_path or loaded[0].metadata["backbone"]["path"]
    if not self.backbone_path:
      raise ValueError(f"task {loaded[0].name!r} records no backbone path; pass backbone_path")
    self.backbone_fingerprint = npz_lib.fingerprint(self.backbone_path)
    for export in loaded:
      recorded = export.metadata["backbone"]["sha256"]
      if recorded != self.backbone_fingerprint:
        raise ExportError(
            f"Backbone mismatch: task {export.name!r} ({export.directory}) was trained on a "
            f"backbone with sha256 {recorded[:16]}... ({export.metadata['backbone']['path']}) "
            f"but the served backbone {self.backbone_path} has "
            f"{self.backbone_fingerprint[:16]}...; serve tasks of different backbones with "
            "separate servers")
    self.image_size = int(loaded[0].metadata["image_size"])
    self.export_bytes = sum(_nbytes(e.variables) for e in loaded)

    variant = loaded[0].metadata["model"]["variant"]
    backbone_arrays, self._backbone_source = factory.read_backbone_file(
        self.backbone_path, variant)
    by_structure: dict[str, list[LoadedExport]] = {}
    for export in loaded:
      by_structure.setdefault(structure_key(export), []).append(export)
    self._shared_cache: dict[str, jax.Array] = {}
    self.groups = [self._build_group(members, backbone_arrays)
                   for members in by_structure.values()]
    del backbone_arrays  # only the device copies of the leaves the models read stay
    # The stacked device copies replace the host arrays as read.
    self.tasks = {e.name: dataclasses.replace(e, variables={}) for e in loaded}
    # task name -> (group number, row in the group's stacked variables)
    self._where = {name: (g, group.task_names.index(name))
                   for g, group in enumerate(self.groups) for name in group.task_names}
    self.max_classes = max(e.num_classes for e in loaded)

  @staticmethod
  def _check_same(loaded, what: str, value, why: str) -> None:
    values = {e.name: value(e) for e in loaded}
    if len(set(values.values())) > 1:
      raise ExportError(f"tasks differ in {what}: {values}; {why}")

  def _build_group(self, members: list[LoadedExport], backbone_arrays) -> TaskGroup:
    """Builds one group's model, shared backbone leaves and stacked task variables."""
    first = members[0]
    max_classes = max(e.num_classes for e in members)
    spec = first.metadata["model"]
    model = factory.build_model(spec, max_classes)
    shapes = trees.flatten(factory.variable_shapes(model, self.image_size))
    per_task = stack_task_variables(members, max_classes)
    for path, value in per_task.items():
      if path not in shapes or tuple(shapes[path].shape) != value.shape[1:]:
        raise ExportError(
            f"task {first.name!r}: exported {path} {value.shape[1:]} does not fit the "
            f"model ({getattr(shapes.get(path), 'shape', 'absent')}); re-export the task")
    missing_stats = sorted(p for p in shapes if p.startswith(f"{BATCH_STATS}/")
                           and p not in per_task)
    if missing_stats:
      # Running averages the export does not hold (e.g. a BatchNorm backbone's)
      # are not served from the backbone file.
      raise ExportError(f"task {first.name!r}: the model has batch statistics its export "
                        f"lacks ({', '.join(missing_stats[:3])}); multi-task serving takes "
                        "every batch statistic from the exports; classify with this task "
                        "alone (predict.predict_files)")
    # Strict merge (missing/unexpected keys are errors); the method's own and
    # the exported parameters are not read from the file.
    exported = [k[len(PARAMS) + 1:] for k in per_task if k.startswith(f"{PARAMS}/")]
    param_shapes = trees.unflatten({k[len(PARAMS) + 1:]: v for k, v in shapes.items()
                                    if k.startswith(f"{PARAMS}/")})
    merged = trees.flatten(npz_lib.merge_backbone(
        param_shapes, backbone_arrays, fresh=task_export.fresh_patterns(spec, exported),
        source=self._backbone_source))
    leftover = sorted(p for p, v in merged.items()
                      if isinstance(v, jax.ShapeDtypeStruct) and p not in exported)
    if leftover:
      raise ExportError(
          f"task {first.name!r} uses parameters that are neither in the backbone file nor "
          f"in its export ({', '.join(leftover[:5])}): they were frozen at a random "
          "initialisation; classify with this task alone (predict.predict_files)")
    shared = {}
    for path, value in merged.items():
      if isinstance(value, jax.ShapeDtypeStruct):
        continue
      key = f"{PARAMS}/{path}"
      if key not in self._shared_cache:
        self._shared_cache[key] = jax.device_put(value)
      elif (self._shared_cache[key].shape, self._shared_cache[key].dtype) != (value.shape,
                                                                              value.dtype):
        raise ExportError(f"task {first.name!r} reads the backbone's {path} as "
                          f"{value.dtype}{value.shape}, other tasks as "
                          f"{self._shared_cache[key].dtype}{self._shared_cache[key].shape}; "
                          "serve them with separate servers")
      shared[key] = self._shared_cache[key]
    norms = [e.metadata["normalization"] for e in members]
    return TaskGroup(
        model=model, task_names=tuple(e.name for e in members), shared=shared,
        per_task={k: jax.device_put(v) for k, v in per_task.items()},
        mean=jnp.asarray([n["mean"] for n in norms], jnp.float32),
        std=jnp.asarray([n["std"] for n in norms], jnp.float32),
        num_classes=jnp.asarray([e.num_classes for e in members], jnp.int32))

  def num_classes(self, task: str) -> int:
    """The class count of ``task``."""
    return self.tasks[self._check_task(task)].num_classes

  def _check_task(self, task: str) -> str:
    if task not in self.tasks:
      raise ValueError(f"unknown task {task!r}; this server has {sorted(self.tasks)}")
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
      raise ValueError(f"images must be (B, {self.image_size}, {self.image_size}, 3) pixel "
                       f"arrays (resize to the tasks' image size), got {images.shape}")
    if len(tasks) != images.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {len(tasks)} task names; give one "
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
