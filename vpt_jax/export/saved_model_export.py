"""A TensorFlow SavedModel of a served model (``stablehlo_export.ServedModel``), for TF Serving.

Written with ``jax2tf.convert`` (native serialisation, the only mode at the
pinned jax): the SavedModel's graph holds the same StableHLO function as
``model.stablehlo`` inside one ``XlaCallModule`` op, lowered for the given
platforms, and the weights as TF variables (so the graph stays small; a
graph proto cannot exceed 2 GB). Its ``serving_default`` signature takes the
inputs by name ("images" uint8 (B, S, S, 3), and for stacked tasks
"task_index" int32 (B,)) and returns {"logits", "probabilities"} float32
(B, C); B is any batch size (None) or the fixed one. Loading needs
TensorFlow only (2.12 or newer, for ``XlaCallModule``); not jax, not vpt_jax.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
from jax.experimental import jax2tf
import numpy as np
import tensorflow as tf

from vpt_jax.export import stablehlo_export

SAVED_MODEL_DIR = "saved_model"
SIGNATURE = "serving_default"


def _polymorphic_shape(shape: Sequence[int], batch_size: int) -> str:
  """jax2tf's spelling of an input's shape: "(b, 224, 224, 3)" for a symbolic batch."""
  batch = str(batch_size) if batch_size else stablehlo_export.BATCH_AXIS
  return "(" + ", ".join([batch, *map(str, shape)]) + ")"


def _tf_module(served: stablehlo_export.ServedModel, batch_size: int,
               platforms: Sequence[str]) -> tf.Module:
  """A tf.Module holding the weights as variables and the converted function."""
  converted = jax2tf.convert(
      served.fn, with_gradient=False, native_serialization_platforms=tuple(platforms),
      polymorphic_shapes=[None] + [_polymorphic_shape(shape, batch_size)
                                   for _, shape, _ in served.inputs])
  module = tf.Module()
  # Variables, not constants: the weights are saved beside the graph, not in it.
  module.weights = tf.nest.map_structure(
      lambda leaf: tf.Variable(np.asarray(leaf), trainable=False),
      jax.tree.map(np.asarray, served.weights))
  signature = [tf.TensorSpec((batch_size or None, *shape), tf.as_dtype(dtype), name=name)
               for name, shape, dtype in served.inputs]

  @tf.function(input_signature=signature, autograph=False)
  def serve(*inputs):
    return converted(module.weights, *inputs)

  module.serve = serve
  return module


def load_snippet(served: stablehlo_export.ServedModel, path: str) -> str:
  """Three lines of Python that load and call the SavedModel at ``path``."""
  args = ", ".join(f"{name}={name}" for name, _, _ in served.inputs)
  return ("import tensorflow as tf\n"
          f"model = tf.saved_model.load({path!r}).signatures[{SIGNATURE!r}]\n"
          f"outputs = model({args})  # {{'logits', 'probabilities'}}: float32 "
          f"(B, {served.num_classes})")


def write_saved_model(served: stablehlo_export.ServedModel, directory: str, *,
                      batch_size: int = 0,
                      platforms: Sequence[str] = ("cpu", "cuda", "tpu")) -> str:
  """Writes ``directory/saved_model/`` and ``directory/model.json``; returns ``directory``.

  The save traces the signature, where jax2tf lowers the model (once), before
  it writes anything: a model that cannot be exported fails there with
  ``stablehlo_export.export_errors``' one-line errors.
  """
  module = _tf_module(served, batch_size, platforms)
  path = os.path.join(directory, SAVED_MODEL_DIR)
  with stablehlo_export.export_errors(served):
    tf.saved_model.save(module, path, signatures={SIGNATURE: module.serve})
  stablehlo_export.write_sidecar(
      served, directory, export_format="saved_model", batch_size=batch_size,
      platforms=platforms,
      load=load_snippet(served, stablehlo_export.local_path(path)))
  return directory
