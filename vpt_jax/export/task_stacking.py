"""The stacked many-task model: exports grouped by structure, stacked, gathered per example.

Which tasks share a forward pass (a "group"): exports whose models have the
same structure, i.e. the same model spec (method, variant, image size, prompt
count, method settings, ...; training-only dropout rates ignored) and the same
exported leaves. Tasks of different structure (say VPT-deep with 10 and with 50
prompts, or VPT and LoRA) cannot share one stacked tree, so a mixed batch runs
one forward per group, each on its examples only.

Per-task variables are stacked on a leading task axis; the jitted forward
gathers, for every example, its task's row and runs ``model.apply`` under
``jax.vmap`` over the examples with the backbone broadcast (``in_axes=None``),
so XLA folds the example axis into the backbone's matmuls: one forward pass for
the whole batch, no per-example loop. Heads are zero-padded to their group's
largest class count inside the forward, and the padded columns are masked.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.checkpoints import merge as merge_lib
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.export import served_exports
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.models import attention_kernels
from vpt_jax.params import trees

# The head's output layer: the only per-task leaves whose shape depends on the
# class count (padded to the group's largest).
HEAD_KERNEL = "params/head/kernel"
HEAD_BIAS = "params/head/bias"
# Spec fields that act only while training: tasks differing only in these share
# a structure (dropout is off at inference; remat changes only the backward pass,
# as does model.attention=recompute: structure_key compares forward kernels).
TRAINING_ONLY_FIELDS = ("dropout_rate", "prompt_dropout", "remat")
TRAINING_ONLY_SETTINGS = ("dropout", "drop_path", "backbone_drop_path")


def structure_key(export: served_exports.LoadedExport) -> str:
  """A string equal for exports that can share one stacked tree and forward.

  The model spec without training-only fields, plus every exported leaf's
  path and shape, except the head output layer's class axis.
  """
  spec = {k: v for k, v in export.metadata["model"].items() if k not in TRAINING_ONLY_FIELDS}
  # Specs name the kernel only when it is not einsum.
  kernel = attention_kernels.forward_kernel(spec.pop("attention", "einsum"))
  if kernel != "einsum":
    spec["attention"] = kernel
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


def group_by_structure(
    loaded: Sequence[served_exports.LoadedExport]) -> list[list[served_exports.LoadedExport]]:
  """The exports in groups of equal ``structure_key``, in order of first appearance."""
  by_structure: dict[str, list[served_exports.LoadedExport]] = {}
  for export in loaded:
    by_structure.setdefault(structure_key(export), []).append(export)
  return list(by_structure.values())


def _padded(path: str, value: np.ndarray, num_classes: int) -> np.ndarray:
  """Zero-pads the head output layer's class axis (last) to ``num_classes``."""
  if path not in (HEAD_KERNEL, HEAD_BIAS):
    return value
  widths = [(0, 0)] * (value.ndim - 1) + [(0, num_classes - value.shape[-1])]
  return np.pad(value, widths)


def stack_task_variables(exports: Sequence[served_exports.LoadedExport], num_classes: int) -> dict:
  """Stacks same-structure exports: {path: (K, ...)}, heads padded to ``num_classes``.

  Raises:
    ExportError: the exports do not hold the same leaves and shapes.
  """
  first = exports[0]
  first_key = structure_key(first)
  for export in exports[1:]:
    if structure_key(export) != first_key:
      raise task_export.ExportError(f"tasks {first.name!r} and {export.name!r} differ in structure; "
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


def _check_fits_model(first: served_exports.LoadedExport, per_task: Mapping[str, Any],
                      shapes: Mapping[str, Any]) -> None:
  """Raises ExportError if the stacked leaves do not fit the group's model."""
  for path, value in per_task.items():
    if path not in shapes or tuple(shapes[path].shape) != value.shape[1:]:
      raise task_export.ExportError(
          f"task {first.name!r}: exported {path} {value.shape[1:]} does not fit the "
          f"model ({getattr(shapes.get(path), 'shape', 'absent')}); re-export the task")
  missing_stats = sorted(p for p in shapes if p.startswith(f"{served_exports.BATCH_STATS}/")
                         and p not in per_task)
  if missing_stats:
    # Running averages the export does not hold (e.g. a BatchNorm backbone's)
    # are not served from the backbone file.
    raise task_export.ExportError(
        f"task {first.name!r}: the model has batch statistics its export "
        f"lacks ({', '.join(missing_stats[:3])}); multi-task serving takes "
        "every batch statistic from the exports; classify with this task "
        "alone (predict.predict_files)")


def _merged_backbone(first: served_exports.LoadedExport, per_task: Mapping[str, Any],
                     shapes: Mapping[str, Any], backbone_arrays,
                     backbone_source) -> dict[str, Any]:
  """Flat {param path: backbone array}, or a ShapeDtypeStruct for exported leaves.

  Strict merge (missing/unexpected keys are errors); the method's own and the
  exported parameters are not read from the file.
  """
  prefix = f"{served_exports.PARAMS}/"
  exported = [k[len(prefix):] for k in per_task if k.startswith(prefix)]
  param_shapes = trees.unflatten({k[len(prefix):]: v for k, v in shapes.items()
                                  if k.startswith(prefix)})
  merged = trees.flatten(merge_lib.merge_backbone(
      param_shapes, backbone_arrays,
      fresh=task_export.fresh_patterns(first.metadata["model"], exported),
      source=backbone_source))
  leftover = sorted(p for p, v in merged.items()
                    if isinstance(v, jax.ShapeDtypeStruct) and p not in exported)
  if leftover:
    raise task_export.ExportError(
        f"task {first.name!r} uses parameters that are neither in the backbone file nor "
        f"in its export ({', '.join(leftover[:5])}): they were frozen at a random "
        "initialisation; classify with this task alone (predict.predict_files)")
  return merged


def _shared_leaves(first: served_exports.LoadedExport, merged: Mapping[str, Any],
                   shared_cache: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The group's backbone leaves on the device, one copy per path for all groups."""
  shared = {}
  for path, value in merged.items():
    if isinstance(value, jax.ShapeDtypeStruct):
      continue
    key = f"{served_exports.PARAMS}/{path}"
    if key not in shared_cache:
      shared_cache[key] = jax.device_put(value)
    elif (shared_cache[key].shape, shared_cache[key].dtype) != (value.shape, value.dtype):
      raise task_export.ExportError(
          f"task {first.name!r} reads the backbone's {path} as "
          f"{value.dtype}{value.shape}, other tasks as "
          f"{shared_cache[key].dtype}{shared_cache[key].shape}; "
          "serve them with separate servers")
    shared[key] = shared_cache[key]
  return shared


def build_task_group(members: Sequence[served_exports.LoadedExport], backbone_arrays, *,
                     backbone_source, image_size: int,
                     shared_cache: dict[str, jax.Array]) -> TaskGroup:
  """Builds one group's model, shared backbone leaves and stacked task variables.

  Args:
    members: exports of one structure (``group_by_structure``).
    backbone_arrays, backbone_source: ``factory.read_backbone_file``'s result.
    image_size: the tasks' input size S.
    shared_cache: {"params/<path>": device array} shared by all groups of a
      server; filled with the leaves this group reads.
  """
  first = members[0]
  max_classes = max(e.num_classes for e in members)
  model = factory.build_model(first.metadata["model"], max_classes)
  shapes = trees.flatten(factory.variable_shapes(model, image_size))
  per_task = stack_task_variables(members, max_classes)
  _check_fits_model(first, per_task, shapes)
  merged = _merged_backbone(first, per_task, shapes, backbone_arrays, backbone_source)
  shared = _shared_leaves(first, merged, shared_cache)
  norms = [e.metadata["normalization"] for e in members]
  return TaskGroup(
      model=model, task_names=tuple(e.name for e in members), shared=shared,
      per_task={k: jax.device_put(v) for k, v in per_task.items()},
      mean=jnp.asarray([n["mean"] for n in norms], jnp.float32),
      std=jnp.asarray([n["std"] for n in norms], jnp.float32),
      num_classes=jnp.asarray([e.num_classes for e in members], jnp.int32))
