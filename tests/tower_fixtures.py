"""Tiny DINOv2 / CLIP / SigLIP checkpoints in their official key layouts, and the
model loaded from one (width 16, 2 heads of 8, 2 blocks, 4 px patches)."""

from __future__ import annotations

import collections

import numpy as np

import flavour_fixtures
import torch_fixtures
from vpt_jax.methods import factory
from vpt_jax.methods import registry

D, HEADS, DEPTH, PATCH = 16, 2, 2, 4


def rand(rng):
  """r(*shape): float32 normal values at scale 0.5."""
  return lambda *shape: (0.5 * rng.standard_normal(shape)).astype(np.float32)


def dinov2_state(*, registers: bool, swiglu: bool, grid: int = 5, seed: int = 0) -> dict:
  """dinov2_vit*14[_reg4]_pretrain.pth's keys (block_chunks=0) at the test size."""
  r = rand(np.random.default_rng(seed))
  state = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + grid * grid, D),
           "mask_token": np.zeros((1, D), np.float32),
           "patch_embed.proj.weight": r(D, 3, PATCH, PATCH), "patch_embed.proj.bias": r(D)}
  if registers:
    state["register_tokens"] = r(1, 4, D)
  for i in range(DEPTH):
    b = f"blocks.{i}."
    state.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
                  b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
                  b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                  b + "ls1.gamma": r(D), b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
                  b + "ls2.gamma": r(D)})
    if swiglu:  # testg: hidden 24
      state.update({b + "mlp.w12.weight": r(48, D), b + "mlp.w12.bias": r(48),
                    b + "mlp.w3.weight": r(D, 24), b + "mlp.w3.bias": r(D)})
    else:
      state.update({b + "mlp.fc1.weight": r(32, D), b + "mlp.fc1.bias": r(32),
                    b + "mlp.fc2.weight": r(D, 32), b + "mlp.fc2.bias": r(D)})
  state["norm.weight"], state["norm.bias"] = 1 + r(D), r(D)
  return state


def clip_state(*, grid: int = 4, embed: int = 8, seed: int = 0, text: bool = True) -> dict:
  """open_clip_pytorch_model.bin's keys (``visual.*``, plus a token of the text tower)."""
  r = rand(np.random.default_rng(seed))
  v = "visual."
  state = {v + "class_embedding": r(D), v + "positional_embedding": r(1 + grid * grid, D),
           v + "proj": r(D, embed), v + "conv1.weight": r(D, 3, PATCH, PATCH),
           v + "ln_pre.weight": 1 + r(D), v + "ln_pre.bias": r(D),
           v + "ln_post.weight": 1 + r(D), v + "ln_post.bias": r(D)}
  for i in range(DEPTH):
    b = f"{v}transformer.resblocks.{i}."
    state.update({b + "attn.in_proj_weight": r(3 * D, D), b + "attn.in_proj_bias": r(3 * D),
                  b + "attn.out_proj.weight": r(D, D), b + "attn.out_proj.bias": r(D),
                  b + "ln_1.weight": 1 + r(D), b + "ln_1.bias": r(D),
                  b + "mlp.c_fc.weight": r(32, D), b + "mlp.c_fc.bias": r(32),
                  b + "mlp.c_proj.weight": r(D, 32), b + "mlp.c_proj.bias": r(D),
                  b + "ln_2.weight": 1 + r(D), b + "ln_2.bias": r(D)})
  if text:  # the text tower shares the file; the image tower ignores it
    state.update({"token_embedding.weight": r(10, D), "text_projection": r(D, embed),
                  "logit_scale": np.array(4.6, np.float32), "positional_embedding": r(5, D)})
  return state


def write_torch(state: dict, path) -> None:
  """``state`` as torch.save writes a plain state dict (zip format)."""
  tensors = collections.OrderedDict(
      (name, torch_fixtures.tensor_of(value, str(i))) for i, (name, value) in enumerate(
          state.items()))
  torch_fixtures.write_torch_zip(tensors, path)


def tower_spec(method: str, variant: str, image_size: int, **overrides) -> dict:
  """A model spec for a tower variant (3 prompts if the method has any)."""
  return flavour_fixtures.flavour_spec(method, variant, image_size=image_size, **overrides)


def loaded_model(method: str, variant: str, path, image_size: int, num_classes: int = 5,
                 **overrides):
  """(model, params): the spec's model with the backbone read from ``path``."""
  spec = tower_spec(method, variant, image_size, **overrides)
  model = factory.build_model(spec, num_classes)
  params = factory.init_variables(model, image_size, seed=1)["params"]
  fresh = registry.get_method(method).fresh_patterns
  return model, factory.load_backbone_file(params, str(path), variant, fresh)


def images(image_size: int, batch: int = 2, seed: int = 5) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(
      (batch, image_size, image_size, 3)).astype(np.float32)
