"""Exports that serve without vpt_jax: a serialised ``jax.export`` function and a JSON sidecar.

A task export (``task_export``: trained leaves + task.json) needs this library
and its backbone file to run. This module turns one, or several sharing a
backbone (``serving``), into a self-contained StableHLO function that any
program with jax can load and call (``jax.export.deserialize(...).call``):

* single task, ``f(images)``: images uint8 (B, S, S, 3), pixel values as
  decoded, B fixed or symbolic ("b": any batch size, the default);
* stacked tasks, ``f(images, task_index)``: plus int32 (B,), each example's
  task as its position in the sidecar's "tasks" list.

Normalisation happens inside. The output is a dict of two float32 (B, C)
arrays: "logits" and "probabilities" (their softmax), so a server needs no
post-processing and a caller who calibrates or ensembles has the logits.
Stacked tasks: C is the largest class count, row i holds example i's task's
classes first, logits -inf (probabilities 0) beyond them; a task index out
of range gives a row of NaN. Tasks of different structure (``task_stacking``)
each run a forward over the whole batch, selected per example, so one call
costs one forward per structure group: stack tasks of one structure.

The weights are constants inside the function: ``model.stablehlo`` is the
whole model (for ViT-B/16 about 345 MB). It is lowered for the ``platforms``
given (by default CPU, CUDA and TPU: it runs on any of them). ``model.json``
describes it: inputs and outputs, class names, image size, normalisation,
backbone fingerprint, jax version and how to load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import tensorflow as tf

from vpt_jax.data import normalization as normalization_lib
from vpt_jax.export import serving
from vpt_jax.export import task_export
from vpt_jax.export import task_stacking
from vpt_jax.methods import factory

# The values of config.export.format: the library's own export, then the standalone ones.
FORMATS = ("npz", "stablehlo", "saved_model")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = "cpu,cuda,tpu"
SIDECAR_FORMAT = "vpt_jax.served_model"
SIDECAR_VERSION = 1
FUNCTION_FILE = "model.stablehlo"
SIDECAR_FILE = "model.json"
BATCH_AXIS = "b"  # the name of the symbolic batch dimension
OUTPUTS = ("logits", "probabilities")


def check_settings(export_format: str, batch_size: int, platforms: str) -> tuple[str, ...]:
  """Checks export settings before any work; returns the platforms as a tuple.

  Raises:
    ExportError: an unknown format or platform, or a negative batch size.
  """
  if export_format not in FORMATS:
    raise task_export.ExportError(
        f"unknown export.format {export_format!r}; choose one of {', '.join(FORMATS)}")
  if batch_size < 0:
    raise task_export.ExportError(
        f"export.batch_size={batch_size}: use 0 for any batch size (symbolic) or a fixed "
        "batch size >= 1")
  names = tuple(p.strip() for p in platforms.split(",") if p.strip())
  unknown = sorted(set(names) - set(KNOWN_PLATFORMS))
  if not names or unknown:
    raise task_export.ExportError(
        f"export.platforms={platforms!r}: give a comma-separated subset of "
        f"{', '.join(KNOWN_PLATFORMS)}, e.g. {DEFAULT_PLATFORMS!r}")
  return names


@dataclasses.dataclass
class ServedModel:
  """A pure function of (weights, *inputs) and what its sidecar says about it.

  Attributes:
    fn: (weights, images[, task_index]) -> {"logits", "probabilities"}.
    weights: the arrays ``fn`` reads (a pytree): baked in as constants
      (StableHLO) or held as variables (SavedModel).
    inputs: (name, shape after the batch axis, dtype name) per input.
    num_classes: C, the outputs' second axis.
    description: the sidecar's fields about the model (kind, tasks, image
      size, backbone).
  """
  fn: Callable[..., dict]
  weights: Any
  inputs: tuple[tuple[str, tuple[int, ...], str], ...]
  num_classes: int
  description: dict


def _with_probabilities(logits) -> dict:
  logits = logits.astype(jnp.float32)
  return {"logits": logits, "probabilities": jax.nn.softmax(logits, axis=-1)}


def _task_entry(name: str, metadata: dict) -> dict:
  return {"name": name, "method": metadata["model"]["method"],
          "num_classes": int(metadata["num_classes"]),
          "class_names": task_export.class_names(metadata),
          "normalization": metadata["normalization"]}


def _single_task(model, variables, norm: dict, size: int, description: dict) -> ServedModel:
  def fn(weights, images):
    inputs = normalization_lib.normalize_images(images, norm["mean"], norm["std"])
    return _with_probabilities(model.apply(weights, inputs))

  return ServedModel(fn=fn, weights=variables,
                     inputs=(("images", (size, size, 3), "uint8"),),
                     num_classes=int(model.num_classes), description=description)


def single_task_model(export_dir: str, backbone_path: Optional[str] = None) -> ServedModel:
  """The model of one task export (backbone file + export, ``task_export``)."""
  model, variables, metadata = task_export.load_task_variables(export_dir, backbone_path)
  task = _task_entry(os.path.basename(os.path.normpath(export_dir)), metadata)
  return _single_task(
      model, variables, metadata["normalization"], int(metadata["image_size"]),
      {"kind": "single_task", "image_size": int(metadata["image_size"]), "tasks": [task],
       "class_names": task["class_names"], "normalization": metadata["normalization"],
       "backbone": {**metadata["backbone"], "variant": metadata["model"]["variant"]}})


def check_exportable(spec: dict, normalization: dict, batch_size: int,
                     platforms: Sequence[str]) -> None:
  """Traces and lowers the model of a spec with abstract weights: no data, no compile.

  Run before training, so a model that cannot be exported fails at once.

  Raises:
    ExportError: as ``export_function``.
  """
  model = factory.build_model(spec, 2)  # the class count does not change what exports
  shapes = factory.variable_shapes(model, spec["image_size"])
  served = _single_task(model, shapes, normalization, int(spec["image_size"]),
                        {"tasks": [{"method": spec["method"]}]})
  export_function(served, batch_size, platforms, weights_as_constants=False)


def _stacked_fn(groups: Sequence[task_stacking.TaskGroup], task_group, task_row,
                max_classes: int, weights: dict, images, task_index) -> dict:
  """Each group's forward on the whole batch, selected per example (see the module doc)."""
  group, row = task_group[task_index], task_row[task_index]
  logits = jnp.full((images.shape[0], max_classes), jnp.nan, jnp.float32)
  for g, (members, stacked) in enumerate(zip(groups, weights["groups"])):
    shared = {path: weights["backbone"][path] for path in members.shared}
    rows = jnp.where(group == g, row, 0)
    own = task_stacking.mixed_task_logits(
        members.model, shared, stacked["per_task"], stacked["mean"], stacked["std"],
        stacked["num_classes"], images, rows)
    own = jnp.pad(own, ((0, 0), (0, max_classes - own.shape[1])), constant_values=-jnp.inf)
    logits = jnp.where((group == g)[:, None], own, logits)
  known = (task_index >= 0) & (task_index < task_group.shape[0])
  return _with_probabilities(jnp.where(known[:, None], logits, jnp.nan))


def stacked_tasks_model(exports: Mapping[str, str],
                        backbone_path: Optional[str] = None) -> ServedModel:
  """The many-task model of exports sharing one backbone (``serving.MultiTaskServer``).

  Task index k means the k-th task of ``exports`` (the sidecar's "tasks").
  """
  server = serving.MultiTaskServer(exports, backbone_path)
  names = list(exports)
  task_group = jnp.asarray([server.location(n)[0] for n in names], jnp.int32)
  task_row = jnp.asarray([server.location(n)[1] for n in names], jnp.int32)
  weights = {"backbone": server.backbone_leaves,
             "groups": [{"per_task": g.per_task, "mean": g.mean, "std": g.std,
                         "num_classes": g.num_classes} for g in server.groups]}
  metadata = {n: server.tasks[n].metadata for n in names}
  size = server.image_size
  return ServedModel(
      fn=functools.partial(_stacked_fn, server.groups, task_group, task_row,
                           server.max_classes),
      weights=weights,
      inputs=(("images", (size, size, 3), "uint8"), ("task_index", (), "int32")),
      num_classes=server.max_classes,
      description={"kind": "stacked_tasks", "image_size": size,
                   "tasks": [_task_entry(n, metadata[n]) for n in names],
                   "structure_groups": len(server.groups),
                   "backbone": {"path": server.backbone_path,
                                "sha256": server.backbone_fingerprint,
                                "variant": metadata[names[0]]["model"]["variant"]}})


def batch_dimension(batch_size: int):
  """The batch axis: ``batch_size`` itself, or the symbolic "b" for 0."""
  if batch_size:
    return batch_size
  return jax.export.symbolic_shape(BATCH_AXIS)[0]


def input_specs(served: ServedModel, batch_size: int) -> list[jax.ShapeDtypeStruct]:
  """The function's inputs as ShapeDtypeStructs, batch axis first."""
  batch = batch_dimension(batch_size)
  return [jax.ShapeDtypeStruct((batch, *shape), jnp.dtype(dtype))
          for _, shape, dtype in served.inputs]


def _what(served: ServedModel) -> str:
  methods = sorted({t["method"] for t in served.description["tasks"]})
  return f"the {'/'.join(methods)} model"


@contextlib.contextmanager
def export_errors(served: ServedModel) -> Iterator[None]:
  """Turns a failure to trace or serialise ``served`` (``jax.export``) into a one-line ExportError.

  Raises:
    ExportError: the model cannot be traced with a symbolic batch, or holds
      an operation that cannot be serialised (e.g. a host callback).
  """
  try:
    yield
  except jax.errors.InconclusiveDimensionOperation as e:
    raise task_export.ExportError(
        f"{_what(served)} cannot be exported for any batch size ({str(e).splitlines()[0]}); "
        "set a fixed batch size, e.g. --config.export.batch_size=32") from e
  except (NotImplementedError, ValueError) as e:
    # Host callbacks (NotImplementedError) and custom calls without a
    # compatibility guarantee (ValueError) have no serialised form.
    raise task_export.ExportError(
        f"{_what(served)} cannot be serialised ({str(e).splitlines()[0]}); keep the npz "
        "export (--config.export.format=npz) and serve it with vpt_jax") from e


def export_function(served: ServedModel, batch_size: int, platforms: Sequence[str], *,
                    weights_as_constants: bool = True) -> tuple[jax.export.Exported, bytes]:
  """Traces, lowers and serialises ``served``.

  With ``weights_as_constants`` the function takes only the inputs and holds
  the weights; otherwise it takes the weights first (a cheap check of a model
  that is converted differently, e.g. to a SavedModel).

  Raises:
    ExportError: as ``export_errors``.
  """
  specs = input_specs(served, batch_size)
  if weights_as_constants:
    function = jax.jit(functools.partial(served.fn, served.weights))
  else:
    function = jax.jit(served.fn)
    specs = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), served.weights),
             *specs]
  with export_errors(served):
    exported = jax.export.export(function, platforms=tuple(platforms))(*specs)
    return exported, exported.serialize()


def signature(served: ServedModel, batch_size: int) -> dict:
  """The sidecar's input/output signature; shapes list "b" for a symbolic batch."""
  batch = batch_size or BATCH_AXIS
  return {"inputs": [{"name": name, "shape": [batch, *shape], "dtype": dtype}
                     for name, shape, dtype in served.inputs],
          "outputs": [{"name": name, "shape": [batch, served.num_classes],
                       "dtype": "float32"} for name in OUTPUTS]}


def write_sidecar(served: ServedModel, directory: str, *, export_format: str,
                  batch_size: int, platforms: Sequence[str], load: str) -> str:
  """Writes ``directory/model.json`` (everything a server needs to know); returns its path."""
  sidecar = {"format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION,
             "export_format": export_format, **served.description,
             "signature": signature(served, batch_size), "platforms": list(platforms),
             "jax_version": jax.__version__, "load": load}
  path = os.path.join(directory, SIDECAR_FILE)
  task_export.write_atomically(path, json.dumps(sidecar, indent=2, sort_keys=True))
  return path


def local_path(path: str) -> str:
  """``path`` made absolute unless it is remote (gs://...)."""
  return path if "://" in path else os.path.abspath(path)


def load_snippet(served: ServedModel, path: str) -> str:
  """Three lines of Python that load and call the StableHLO function at ``path``."""
  args = ", ".join(name for name, _, _ in served.inputs)
  return ("import jax\n"
          f"model = jax.export.deserialize(open({path!r}, 'rb').read())\n"
          f"outputs = model.call({args})  # {{'logits', 'probabilities'}}: float32 "
          f"(B, {served.num_classes})")


def write_stablehlo(served: ServedModel, directory: str, *, batch_size: int = 0,
                    platforms: Sequence[str] = tuple(DEFAULT_PLATFORMS.split(","))) -> str:
  """Writes ``directory/model.stablehlo`` and ``model.json``; returns ``directory``.

  The function is written before the sidecar, so a sidecar always describes
  a complete function.
  """
  _, serialized = export_function(served, batch_size, platforms)
  tf.io.gfile.makedirs(directory)
  path = os.path.join(directory, FUNCTION_FILE)
  task_export.write_atomically(path, serialized)
  write_sidecar(served, directory, export_format="stablehlo", batch_size=batch_size,
                platforms=platforms, load=load_snippet(served, local_path(path)))
  return directory
