"""Tiny checkpoints written in the exact official on-disk layouts.

The writers spell out the released key names by hand (they are the *expected*
layouts the loader must understand) and never call the loader's converter:

* `write_vit_raw_npz`: google-research/vision_transformer release files, e.g.
  gs://vit_models/imagenet21k/ViT-B_16.npz: pre-Linen names
  (``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``), a
  zeroed 21k-style ``head`` and a ``pre_logits`` layer.
* `write_big_vision_npz`: big_vision native files: ``params/`` prefix, a
  top-level ``pos_embedding`` without the class-token row (added to the patches
  before CLS is concatenated), that row folded into ``cls``; blocks unrolled or
  scanned (stacked on a leading depth axis).

The input is always a parameter tree of our model (``VisionTransformer``'s
names), so tests can compare what the loader produces with what was written.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import numpy_vit
import tolerances
from configs import common
from vpt_jax.checkpoints import merge
from vpt_jax.checkpoints import vit_layouts
from vpt_jax.models import vit

# Released-block names -> our model's names, one entry per leaf, written out.
_ATTENTION_LEAVES = ("query/kernel", "query/bias", "key/kernel", "key/bias",
                     "value/kernel", "value/bias", "out/kernel", "out/bias")
VIT_RAW_BLOCK_NAMES = {
    "LayerNorm_0/scale": "LayerNorm_0/scale",
    "LayerNorm_0/bias": "LayerNorm_0/bias",
    **{f"MultiHeadDotProductAttention_1/{leaf}": f"MultiHeadDotProductAttention_0/{leaf}"
       for leaf in _ATTENTION_LEAVES},
    "LayerNorm_2/scale": "LayerNorm_1/scale",
    "LayerNorm_2/bias": "LayerNorm_1/bias",
    "MlpBlock_3/Dense_0/kernel": "MlpBlock_0/Dense_0/kernel",
    "MlpBlock_3/Dense_0/bias": "MlpBlock_0/Dense_0/bias",
    "MlpBlock_3/Dense_1/kernel": "MlpBlock_0/Dense_1/kernel",
    "MlpBlock_3/Dense_1/bias": "MlpBlock_0/Dense_1/bias",
}
# big_vision blocks already use Linen numbering.
BIG_VISION_BLOCK_NAMES = {
    "LayerNorm_0/scale": "LayerNorm_0/scale",
    "LayerNorm_0/bias": "LayerNorm_0/bias",
    **{f"MultiHeadDotProductAttention_0/{leaf}": f"MultiHeadDotProductAttention_0/{leaf}"
       for leaf in _ATTENTION_LEAVES},
    "LayerNorm_1/scale": "LayerNorm_1/scale",
    "LayerNorm_1/bias": "LayerNorm_1/bias",
    "MlpBlock_0/Dense_0/kernel": "MlpBlock_0/Dense_0/kernel",
    "MlpBlock_0/Dense_0/bias": "MlpBlock_0/Dense_0/bias",
    "MlpBlock_0/Dense_1/kernel": "MlpBlock_0/Dense_1/kernel",
    "MlpBlock_0/Dense_1/bias": "MlpBlock_0/Dense_1/bias",
}
# A stand-in for the 21843 ImageNet-21k classes, kept small.
HEAD_CLASSES = 23


def _get(tree, path: str) -> np.ndarray:
  node = tree
  for name in path.split("/"):
    node = node[name]
  return np.asarray(node, np.float32)


def _params(tree):
  return tree["params"] if set(tree) == {"params"} else tree


def _depth(params) -> int:
  return sum(1 for name in params["Transformer"] if name.startswith("encoderblock_"))


def _write(flat: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
  # np.savez on an open file writes to exactly `path` (no ".npz" appended), as
  # the releases were written.
  with open(path, "wb") as f:
    np.savez(f, **flat)
  return flat


def vit_raw_arrays(params, *, head_classes: int = HEAD_CLASSES,
                   opt_target: bool = False) -> dict[str, np.ndarray]:
  """The flat arrays of a vision_transformer release file for `params`."""
  params = _params(params)
  width = _get(params, "cls").shape[-1]
  flat = {
      "cls": _get(params, "cls"),
      "embedding/kernel": _get(params, "embedding/kernel"),
      "embedding/bias": _get(params, "embedding/bias"),
      "Transformer/posembed_input/pos_embedding":
          _get(params, "Transformer/posembed_input/pos_embedding"),
      "Transformer/encoder_norm/scale": _get(params, "Transformer/encoder_norm/scale"),
      "Transformer/encoder_norm/bias": _get(params, "Transformer/encoder_norm/bias"),
      # The i21k releases ship a zeroed head and a pre_logits layer.
      "head/kernel": np.zeros((width, head_classes), np.float32),
      "head/bias": np.zeros((head_classes,), np.float32),
      "pre_logits/kernel": np.full((width, width), 0.5, np.float32),
      "pre_logits/bias": np.full((width,), 0.25, np.float32),
  }
  for layer in range(_depth(params)):
    for released, ours in VIT_RAW_BLOCK_NAMES.items():
      flat[f"Transformer/encoderblock_{layer}/{released}"] = _get(
          params, f"Transformer/encoderblock_{layer}/{ours}")
  if opt_target:
    # Old training checkpoints: the params under opt/target, optimizer state beside.
    flat = {f"opt/target/{key}": value for key, value in flat.items()}
    flat["opt/state/step"] = np.array(1234, np.int64)
  return flat


def write_vit_raw_npz(params, path, **kwargs) -> dict[str, np.ndarray]:
  """Writes `params` as a vision_transformer release .npz; returns its arrays."""
  return _write(vit_raw_arrays(params, **kwargs), path)


def big_vision_arrays(params, *, scan: bool = False,
                      head_classes: int = HEAD_CLASSES) -> dict[str, np.ndarray]:
  """The flat arrays of a big_vision .npz for `params` (class posemb row folded)."""
  params = _params(params)
  posemb = _get(params, "Transformer/posembed_input/pos_embedding")
  width = posemb.shape[-1]
  flat = {
      # big_vision adds no position embedding to CLS: fold our CLS row into it.
      "params/cls": _get(params, "cls") + posemb[:, :1],
      "params/pos_embedding": posemb[:, 1:],
      "params/embedding/kernel": _get(params, "embedding/kernel"),
      "params/embedding/bias": _get(params, "embedding/bias"),
      "params/Transformer/encoder_norm/scale": _get(params, "Transformer/encoder_norm/scale"),
      "params/Transformer/encoder_norm/bias": _get(params, "Transformer/encoder_norm/bias"),
      "params/head/kernel": np.zeros((width, head_classes), np.float32),
      "params/head/bias": np.zeros((head_classes,), np.float32),
  }
  depth = _depth(params)
  for released, ours in BIG_VISION_BLOCK_NAMES.items():
    per_layer = [_get(params, f"Transformer/encoderblock_{layer}/{ours}")
                 for layer in range(depth)]
    if scan:
      flat[f"params/Transformer/encoderblock/{released}"] = np.stack(per_layer)
    else:
      for layer, value in enumerate(per_layer):
        flat[f"params/Transformer/encoderblock_{layer}/{released}"] = value
  return flat


def write_big_vision_npz(params, path, **kwargs) -> dict[str, np.ndarray]:
  """Writes `params` as a big_vision .npz; returns its arrays."""
  return _write(big_vision_arrays(params, **kwargs), path)


def randomize(tree, seed: int, scale: float = 0.5):
  """Same structure, every leaf replaced by N(0, scale^2) float32 values.

  Random values everywhere (LayerNorm scales too) make "the loaded value equals
  the file's" and "two forwards agree" meaningful: no leaf sits at a trivial
  init value such as ones or zeros.
  """
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda leaf: (rng.standard_normal(np.shape(leaf)) * scale).astype(np.float32), tree)


def write_tiny_backbone(path, *, variant: str = "test/4", image_size: int = 32,
                        seed: int = 5, scale: float = 0.3) -> str:
  """A tiny random "pretrained" backbone in the raw vision_transformer layout.

  No compilation: the values depend only on the shapes and the seed.
  """
  model = vit.VisionTransformer(num_classes=7, variant=variant)
  write_vit_raw_npz(randomize(param_shapes(model, image_size), seed=seed, scale=scale), path)
  return str(path)


def method_config(method: str, variant: str, image_size: int, *, num_prompts: int = 3,
                  **overrides):
  """``configs.common.base_config()`` for ``method`` on a (tiny) ``variant``.

  ``overrides``: "section.field" -> value, e.g. ``**{"model.dropout_rate": 0.0}``.
  """
  config = common.base_config()
  common.apply_method(config, method)
  config.model.variant = variant
  config.model.image_size = image_size
  config.prompt.num_prompts = num_prompts
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def override(config, overrides: dict):
  """``config`` with dotted overrides ("optim.base_lr", "protocol.lrs", "seed") set, locked."""
  config.unlock()
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    node = config
    for name in filter(None, section.split(".")):
      node = node[name]
    node[field] = value
  config.lock()
  return config


def sprites_run_config(**overrides):
  """``configs.common.base_config()`` on vpt_sprites/tiny with dotted ``overrides``, locked."""
  config = common.base_config()
  config.data.builder = "vpt_sprites/tiny"
  config.lock()
  return override(config, overrides)


@dataclasses.dataclass
class TinyCheckpoint:
  """What `make_checkpoint` built: the model, its init, the weights in the file."""
  model: vit.VisionTransformer
  init_params: dict[str, Any]      # the "fresh" params load_backbone starts from
  source_params: dict[str, Any]    # our-layout tree the file was written from
  arrays: dict[str, np.ndarray]    # the file's flat arrays
  path: str
  image_size: int


def param_shapes(model: vit.VisionTransformer, image_size: int):
  """The model's params as ShapeDtypeStructs for (1, size, size, 3) images.

  jax.eval_shape only traces, so no XLA compilation is paid for the tiny models.
  """
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  return variables["params"]


def make_model_params(model: vit.VisionTransformer, image_size: int, seed: int = 0):
  """Stand-in for ``model.init`` params: same tree, shapes and dtypes, random values.

  The loader only needs the structure and the values the fresh leaves keep;
  random values (instead of a real init) keep the tests free of compilation.
  """
  return randomize(param_shapes(model, image_size), seed=1000 + seed)


def make_checkpoint(directory, layout: str, *, variant: str = "test/4",
                    image_size: int = 16, seed: int = 1, filename: str = None,
                    **model_kwargs) -> TinyCheckpoint:
  """Builds a tiny model and writes random backbone weights in `layout`.

  Args:
    directory: where to write (e.g. pytest's ``tmp_path``).
    layout: "vit_raw", "vit_raw_opt" (under opt/target/), "big_vision",
      "big_vision_scan".
    model_kwargs: more VisionTransformer attributes (hooks, pool, ...).
  """
  model = vit.VisionTransformer(num_classes=model_kwargs.pop("num_classes", 5),
                                variant=variant, **model_kwargs)
  init_params = make_model_params(model, image_size, seed=0)
  source = randomize(init_params, seed)
  path = str(directory / (filename or f"{layout}.npz"))
  if layout == "vit_raw":
    arrays = write_vit_raw_npz(source, path)
  elif layout == "vit_raw_opt":
    arrays = write_vit_raw_npz(source, path, opt_target=True)
  elif layout == "big_vision":
    arrays = write_big_vision_npz(source, path)
  elif layout == "big_vision_scan":
    arrays = write_big_vision_npz(source, path, scan=True)
  else:
    raise ValueError(f"unknown fixture layout {layout!r}")
  return TinyCheckpoint(model, init_params, source, arrays, path, image_size)


def load_backbone(init_params, path: str, *, fresh=merge.DEFAULT_FRESH, ignore=()) -> dict:
  """A ViT ``.npz`` (any official layout) merged strictly into a copy of ``init_params``.

  What the factory does for a ViT file (``vit_layouts.read_model_layout``, then
  ``merge.merge_backbone``), with the merge's ``ignore=`` reachable for tests.
  """
  converted, source = vit_layouts.read_model_layout(path)
  return merge.merge_backbone(init_params, converted, fresh=fresh, ignore=ignore,
                              source=source)


# The tiny ViT the methods' forward tests share: width 16, 2 heads, 2 blocks;
# 16 px images -> 17 tokens.
TINY_VIT = dict(num_classes=4, variant="test/4")


def random_params(model: vit.VisionTransformer, image_size: int = 16, seed: int = 3):
  """Random values in every leaf of the model's parameter tree (no trivial init)."""
  return randomize(param_shapes(model, image_size), seed)


def uniform_images(batch: int = 2, seed: int = 0, image_size: int = 16) -> np.ndarray:
  """(batch, size, size, 3) float32 images drawn from U(-1, 1)."""
  shape = (batch, image_size, image_size, 3)
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def assert_matches_numpy(model, params, images, **numpy_kwargs) -> np.ndarray:
  """The model's eval logits, checked against ``numpy_vit.vit_forward``; returns them."""
  logits = np.asarray(model.apply({"params": params}, images))
  np.testing.assert_allclose(logits, numpy_vit.vit_forward(params, images, **numpy_kwargs),
                             **tolerances.FORWARD_VS_NUMPY)
  return logits
