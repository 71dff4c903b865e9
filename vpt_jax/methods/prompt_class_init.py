"""VPT's class-token prompt initialisations (``config.prompt.init``), computed here.

The reference (KMnP/vpt ``vit_ablations.py``) reads an array E of shape
(p, L + 1, D) from ``CLSEMB_PATH`` and requires p = NUM_TOKENS; row j holds
the class token entering each of the L blocks and the last block's output
(before ``encoder_norm``), the layout its ``forward_cls_layerwise`` records.
Its script that aggregates them over a task is not in the repository; the
paper (App. B) initialises the prompts from the downstream classes' [CLS]
embeddings, so here row j is the mean over the training split's examples of
class j (hence num_prompts = number of classes), computed from the backbone
with no prompts, in eval mode. Then, as the reference:

* ``final-cls``: every set (shallow and deep) = E[:, -1] (the final CLS);
* ``cls-nolastl``: set l = E[:, l] (the CLS entering block l);
* ``cls-nofirstl``: set l = E[:, l + 1] (the CLS leaving block l).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.data import normalization as normalization_lib
from vpt_jax.methods import base
from vpt_jax.methods import prompt_ablations
from vpt_jax.models import backbones
from vpt_jax.models import vit
from vpt_jax.models import vit_blocks


def layerwise_class_tokens(model: vit.VisionTransformer, params, images) -> jax.Array:
  """The class token entering every block and leaving the last: (B, L + 1, D).

  ``model`` is a ViT without prompts; ``images`` normalised (B, H, W, 3).
  """
  _, state = model.apply(
      {"params": params}, images, capture_intermediates=lambda module, method: (
          method == "__call__" and isinstance(module, vit_blocks.Encoder1DBlock)),
      mutable=["intermediates"])
  blocks = state["intermediates"]["Transformer"]
  outputs = [blocks[f"encoderblock_{layer}"]["__call__"][0][:, 0]
             for layer in range(len(blocks))]
  first = _block_zero_input(model, params, images)
  return jnp.stack([first] + outputs, axis=1)


def _block_zero_input(model, params, images):
  """The class token entering block 0: CLS + its position embedding (eval mode)."""
  _, state = model.apply(
      {"params": params}, images, capture_intermediates=lambda module, method: (
          method == "__call__" and type(module).__name__ == "AddPositionEmbs"),
      mutable=["intermediates"])
  (posemb,) = [value for name, value in state["intermediates"]["Transformer"].items()
               if name.startswith("posemb")]
  return posemb["__call__"][0][:, 0]


def class_means(spec: Mapping[str, Any], params, images: np.ndarray, labels: np.ndarray,
                num_classes: int, norm: Mapping[str, Any], batch_size: int) -> np.ndarray:
  """E (num_classes, L + 1, D) float32: per-class means of ``layerwise_class_tokens``.

  ``images`` uint8 (N, S, S, 3), normalised with ``norm`` ({"mean", "std"}).

  Raises:
    ValueError: a class without a training example.
  """
  plain = vit.VisionTransformer(num_classes=num_classes, variant=spec["variant"],
                                dtype=backbones.DTYPES[spec["dtype"]])
  backbone = {name: value for name, value in params.items() if name != "vpt"}
  run = jax.jit(lambda p, x: layerwise_class_tokens(
      plain, p, normalization_lib.normalize_images(x, norm["mean"], norm["std"])))
  tokens = np.concatenate([np.asarray(run(backbone, images[start:start + batch_size]),
                                      np.float64)
                           for start in range(0, len(images), batch_size)])
  counts = np.bincount(labels, minlength=num_classes)
  if not counts.all():
    base.fail(f"prompt.init needs a training example of every class; class "
              f"{int(np.argmin(counts))} has none")
  sums = np.zeros((num_classes,) + tokens.shape[1:])
  np.add.at(sums, labels, tokens)
  return (sums / counts[:, None, None]).astype(np.float32)


def prompt_sets(init: str, means: np.ndarray, num_sets: int) -> np.ndarray:
  """The (num_sets, p, D) prompt sets of ``init`` from E (p, L + 1, D)."""
  if init == "final-cls":
    return np.broadcast_to(means[:, -1], (num_sets,) + means[:, -1].shape).copy()
  per_block = means[:, :-1] if init == "cls-nolastl" else means[:, 1:]
  return np.swapaxes(per_block, 0, 1)[:num_sets].copy()


def initialise(spec: Mapping[str, Any], params: dict, images, labels: np.ndarray,
               num_classes: int, norm: Mapping[str, Any], batch_size: int) -> dict:
  """``params`` with the ``vpt`` prompts set from class tokens (``prompt.init``).

  Unchanged for ``init == "random"``.

  Raises:
    ValueError: num_prompts differs from the classes, the images are not one
      array of the model's size, or a class has no example.
  """
  init = prompt_ablations.options(spec)["init"]
  if init == "random":
    return params
  if spec["num_prompts"] != num_classes:
    base.fail(f"prompt.init={init} makes one prompt per class: set "
              f"--config.prompt.num_prompts={num_classes} (got {spec['num_prompts']})")
  if not isinstance(images, np.ndarray):
    base.fail(f"prompt.init={init} reads the training images at the model's size; use "
              "data.preprocess=resize")
  means = class_means(spec, params, images, labels, num_classes, norm, batch_size)
  vpt = dict(params["vpt"])
  num_sets = 1 + (len(vpt["deep"]) if "deep" in vpt else 0)
  sets = prompt_sets(init, means, num_sets)
  vpt["shallow"] = sets[0]
  if "deep" in vpt:
    vpt["deep"] = sets[1:]
  return {**params, "vpt": vpt}
