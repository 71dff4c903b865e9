"""Tiny ResNet / ConvNeXt models with weights converted from official-layout state dicts.

The state dicts come from ``numpy_convnets`` (the NumPy yardstick); the
helpers here build the Flax models, give them variables without compiling an
init, and compile one forward program per model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import numpy_convnets as ref
from vpt_jax.checkpoints import merge
from vpt_jax.models import convnet_family
from vpt_jax.models import convnext
from vpt_jax.models import resnet
from vpt_jax.params import trees

CLASSES = 5
# The tiny sizes of convnet_base.RESNET_SIZES["test"] / CONVNEXT_SIZES["test"].
RESNET_TEST = dict(stem=8, widths=(4, 8), blocks=(1, 2))
CONVNEXT_TEST = dict(dims=(8, 16), depths=(1, 2))


def torch_state(variant: str, seed: int = 0) -> dict:
  if variant == "resnet-test":
    return ref.torch_resnet_state_dict(**RESNET_TEST, seed=seed)
  return ref.torch_convnext_state_dict(**CONVNEXT_TEST, seed=seed)


def numpy_features(variant, state, images, prompts=None, p=0):
  forward = ref.resnet_features if variant.startswith("resnet") else ref.convnext_features
  return forward(state, images, prompts, p)


def model_for(variant: str, num_prompts: int = 0):
  module = resnet.ResNet if variant.startswith("resnet") else convnext.ConvNeXt
  return module(num_classes=CLASSES, variant=variant, num_prompts=num_prompts)


def flax_prompts(tb, lr) -> dict:
  """The reference's NCHW prompt tensors in the model's NHWC layout."""
  return {"top_bottom": tb[0].transpose(1, 2, 0).astype(np.float32),
          "left_right": lr[0].transpose(1, 2, 0).astype(np.float32)}


def images_of(size: int, seed: int = 1, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).normal(0, 1, (batch, size, size, 3)).astype(np.float32)


def random_variables(model, image_size: int, seed: int = 0) -> dict:
  """Values for every variable of ``model`` without running (compiling) its init.

  Random N(0, 0.1) weights, U(0, 1) prompt pixels, BatchNorm scales and
  variances 1, means 0; tests overwrite the backbone from a state dict.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, 3)))
  rng = np.random.default_rng(seed)

  def value(path, shape):
    if path.startswith("vpt/"):
      return rng.uniform(0, 1, shape.shape).astype(np.float32)
    if path.endswith(("/var", "/scale")):
      return np.ones(shape.shape, np.float32)
    if path.endswith("/mean"):
      return np.zeros(shape.shape, np.float32)
    return rng.normal(0, 0.1, shape.shape).astype(np.float32)
  return {collection: trees.unflatten({p: value(p, s) for p, s in
                                           trees.flatten(tree).items()})
          for collection, tree in shapes.items()}


@functools.cache
def forward(model):
  """One compiled program per model: (features, logits)."""
  return jax.jit(lambda variables, images: (
      model.apply(variables, images, return_features=True), model.apply(variables, images)))


def converted_variables(variant, state, image_size, prompts=None, p=0):
  """The model's variables with the backbone merged from ``state`` and, if given, the prompts."""
  model = model_for(variant, p if prompts is not None else 0)
  params = random_variables(model, image_size)["params"]
  family = convnet_family.FAMILIES[variant.split("-")[0]]
  params = merge.merge_backbone(params, family.convert_torch(state, variant),
                                fresh=(r"head/.*", r"vpt/.*"), source="test")
  if prompts is not None:
    params = {**params, "vpt": flax_prompts(*prompts)}
  return model, {"params": params}
