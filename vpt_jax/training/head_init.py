"""Heads that start from class embeddings: ``head.init=file`` and ``head.init=text``.

The linear head computes ``logits = features @ kernel + bias`` with ``kernel``
of shape (D, num_classes). Given class embeddings ``E`` (num_classes, D), the
head starts as

    kernel = scale * normalise(E).T,   bias = bias0,

* ``file``: ``E`` is ``head.file``, a float ``.npy`` of shape (num_classes, D);
  ``normalise`` is row-wise L2 normalisation when ``head.normalize`` (default
  True) and the identity otherwise; ``scale`` is ``head.scale`` (0 = 1); the
  bias is 0.
* ``text``: ``E`` is the CLIP or SigLIP text tower's class embedding
  (``text_heads``): the L2-normalised mean over the templates of the
  L2-normalised text embeddings; ``scale`` is ``head.scale``, 0 = the
  checkpoint's ``exp(logit_scale)`` (100 for OpenAI CLIP); the bias is 0 for
  CLIP and the checkpoint's ``logit_bias`` for SigLIP.

CLIP's zero-shot logits are ``scale * normalise(f) . normalise(E_c)``; the head
reads the unnormalised image features ``f`` (for CLIP ``ln_post(CLS) @ proj``),
so its logits are those times ``|f|`` per example: the same ranking (zero-shot
top-1/top-5 are CLIP's), a softmax ``|f|`` times sharper.

Every check (the file's existence, dtype and shape against the number of
classes and the head's input width) runs before the model is initialised.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from vpt_jax import errors
from vpt_jax.methods import registry
from vpt_jax.params import trees
from vpt_jax.training import text_heads

HEAD_INITS = ("", "file", "text")
HEAD_KERNEL = "head/kernel"


class HeadInitError(errors.UserError):
  """A ``head.*`` setting or file that cannot initialise the head."""


def check_settings(config) -> None:
  """The ``head.*`` fields, before data or compute (``config_checks.validate_config``)."""
  head = config.head
  if head.init not in HEAD_INITS:
    raise HeadInitError(f"Unknown head.init {head.init!r}; choose one of {HEAD_INITS} "
                        "('' = the method's random init)")
  if not head.init:
    return
  if registry.get_method(config.method).head_hidden_layers:
    raise HeadInitError(
        f"head.init={head.init} sets a linear head's rows, but {config.method} has hidden "
        "head layers; use a method with a linear head or --config.head.init=''")
  if head.scale < 0:
    raise HeadInitError(f"head.scale={head.scale} must be >= 0 (0 = the default scale); "
                        "set --config.head.scale to 0 or above")
  if head.init == "file":
    if not head.file:
      raise HeadInitError("head.init=file needs --config.head.file=PATH.npy, a "
                          "(num_classes, D) array of class embeddings")
    if not tf.io.gfile.exists(head.file):
      raise HeadInitError(f"head.file {head.file!r} does not exist; pass the path of a "
                          "(num_classes, D) .npy of class embeddings")
  if head.init == "text":
    text_heads.check_settings(config)


def head_shape(param_shapes: dict) -> tuple[int, int]:
  """(D, num_classes) of the output layer's kernel in the model's abstract params."""
  flat = trees.flatten(param_shapes)
  if HEAD_KERNEL not in flat:
    raise HeadInitError(f"the model has no {HEAD_KERNEL!r} to initialise; use "
                        "--config.head.init='' with this method")
  return tuple(flat[HEAD_KERNEL].shape)


def read_embedding_file(path: str, num_classes: int, width: int) -> np.ndarray:
  """The (num_classes, width) float64 array of ``path``, refused if it cannot be the head's."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      array = np.load(f, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise HeadInitError(f"head.file {path!r} is not a readable .npy ({e}); save the class "
                        "embeddings with numpy.save(path, array)") from e
  if not np.issubdtype(array.dtype, np.floating):
    raise HeadInitError(f"head.file {path!r} holds {array.dtype} values; save float class "
                        "embeddings (num_classes, D)")
  if array.shape != (num_classes, width):
    raise HeadInitError(
        f"head.file {path!r} has shape {array.shape}, but the head needs (num_classes, D) = "
        f"({num_classes}, {width}) for this dataset and backbone; write one row per class "
        "of the backbone's feature width")
  if not np.isfinite(array).all():
    raise HeadInitError(f"head.file {path!r} holds NaN or infinite values; fix the file")
  return array.astype(np.float64)


def head_from_rows(rows: np.ndarray, scale: float, bias: float = 0.0) -> dict:
  """{"kernel": (D, C) float32 = scale * rows.T, "bias": (C,) float32 = bias}."""
  return {"kernel": (scale * rows.T).astype(np.float32),
          "bias": np.full(rows.shape[0], bias, np.float32)}


def initial_head(config, param_shapes: dict, num_classes: int,
                 class_names: Optional[Sequence[str]],
                 checkpoint_arrays: Optional[dict] = None) -> Optional[dict]:
  """The head's {"kernel", "bias"} for ``head.init`` (None for the method's init).

  Args:
    config: the run's config (``head.*`` already passed ``check_settings``).
    param_shapes: the model's params as ShapeDtypeStructs (``factory.variable_shapes``).
    num_classes: the dataset's number of classes.
    class_names: the dataset's class names (for ``text`` without ``head.class_names``).
    checkpoint_arrays: ``text``'s checkpoint arrays, if already read (the backbone file's).
  """
  head = config.head
  if not head.init:
    return None
  width, model_classes = head_shape(param_shapes)
  if model_classes != num_classes:  # the model is built for the data: a bug if they differ
    raise ValueError(f"head has {model_classes} outputs for {num_classes} classes")
  if head.init == "file":
    rows = read_embedding_file(head.file, num_classes, width)
    rows = text_heads.l2_normalise(rows) if head.normalize else rows
    return head_from_rows(rows, head.scale or 1.0)
  return head_from_rows(*text_heads.text_rows(config, width, num_classes, class_names,
                                              checkpoint_arrays))


def set_head(host_params: dict, values: Optional[dict]) -> dict:
  """``host_params`` with ``head/kernel`` and ``head/bias`` replaced by ``values``."""
  if not values:  # None (or "") = the method's init
    return host_params
  flat = trees.flatten(host_params)
  for name, value in values.items():
    if flat[f"head/{name}"].shape != value.shape:
      raise ValueError(f"head/{name}: {value.shape} vs {flat[f'head/{name}'].shape}")
    flat[f"head/{name}"] = value
  return trees.unflatten(flat)

