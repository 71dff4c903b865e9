"""Tiny DINOv2 / CLIP / SigLIP checkpoints in their official key layouts, and the
model loaded from one (width 16, 2 heads of 8, 2 blocks, 4 px patches)."""

from __future__ import annotations

import collections

import numpy as np

import flavour_fixtures
import numpy_vit
import tolerances
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
                 shapes_only: bool = False, **overrides):
  """(model, params): the spec's model with the backbone read from ``path``.

  ``shapes_only``: the fresh parameters stay ShapeDtypeStructs (nothing is
  initialised or compiled), for tests that only read the loaded values.
  """
  spec = tower_spec(method, variant, image_size, **overrides)
  model = factory.build_model(spec, num_classes)
  params = (factory.variable_shapes(model, image_size) if shapes_only else
            factory.init_variables(model, image_size, seed=1))["params"]
  fresh = registry.get_method(method).fresh_patterns
  return model, factory.load_backbone_file(params, str(path), variant, fresh)


def assert_forward_matches(model, params, x, features) -> None:
  """The model's pooled features and logits against the NumPy features (+ head)."""
  np.testing.assert_allclose(model.apply({"params": params}, x, return_features=True),
                             features, **tolerances.FORWARD_VS_NUMPY)
  np.testing.assert_allclose(model.apply({"params": params}, x),
                             numpy_vit.head_forward(params["head"], features),
                             **tolerances.FORWARD_VS_NUMPY)


def images(image_size: int, batch: int = 2, seed: int = 5) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(
      (batch, image_size, image_size, 3)).astype(np.float32)


def _flax_attention(r, prefix: str) -> dict:
  """flax MultiHeadDotProductAttention's q/k/v/out arrays (D, H, D/H) etc."""
  hd = D // HEADS
  arrays = {f"{prefix}{n}/kernel": r(D, HEADS, hd) for n in ("query", "key", "value")}
  arrays.update({f"{prefix}{n}/bias": r(HEADS, hd) for n in ("query", "key", "value")})
  arrays.update({prefix + "out/kernel": r(HEADS, hd, D), prefix + "out/bias": r(D)})
  return arrays


def _flax_ln_mlp(r, prefix: str, norm: str) -> dict:
  return {f"{prefix}{norm}/scale": 1 + r(D), f"{prefix}{norm}/bias": r(D),
          prefix + "MlpBlock_0/Dense_0/kernel": r(D, 32), prefix + "MlpBlock_0/Dense_0/bias": r(32),
          prefix + "MlpBlock_0/Dense_1/kernel": r(32, D), prefix + "MlpBlock_0/Dense_1/bias": r(D)}


def siglip_big_vision(grid: int = 4, seed: int = 0) -> dict:
  """big_vision's SigLIP .npz keys (``params/img/...`` beside the text tower)."""
  r = rand(np.random.default_rng(seed))
  img = {"embedding/kernel": r(PATCH, PATCH, 3, D), "embedding/bias": r(D),
         "pos_embedding": r(1, grid * grid, D),
         "Transformer/encoder_norm/scale": 1 + r(D), "Transformer/encoder_norm/bias": r(D),
         "MAPHead_0/probe": r(1, 1, D)}
  for i in range(DEPTH):
    block = f"Transformer/encoderblock_{i}/"
    img.update({block + "LayerNorm_0/scale": 1 + r(D), block + "LayerNorm_0/bias": r(D)})
    img.update(_flax_attention(r, block + "MultiHeadDotProductAttention_0/"))
    img.update(_flax_ln_mlp(r, block, "LayerNorm_1"))
  img.update(_flax_attention(r, "MAPHead_0/MultiHeadDotProductAttention_0/"))
  img.update(_flax_ln_mlp(r, "MAPHead_0/", "LayerNorm_0"))
  arrays = {"params/img/" + key: value for key, value in img.items()}
  arrays.update({"params/txt/Embed_0/embedding": r(10, D), "params/t": r(1), "params/b": r(1)})
  return arrays


def _hf_linear(kernel) -> np.ndarray:
  """A flax kernel (in..., out...) -> torch's (out, in) weight."""
  return kernel.reshape(D, -1).T if kernel.shape[0] == D else kernel.reshape(-1, D).T


def siglip_hf_from_big_vision(arrays: dict) -> dict:
  """transformers' ``vision_model.*`` state dict of the same weights (its conversion script)."""
  img = {k[len("params/img/"):]: v for k, v in arrays.items() if k.startswith("params/img/")}
  v = "vision_model."
  state = {v + "embeddings.patch_embedding.weight": img["embedding/kernel"].transpose(3, 2, 0, 1),
           v + "embeddings.patch_embedding.bias": img["embedding/bias"],
           v + "embeddings.position_embedding.weight": img["pos_embedding"].reshape(-1, D),
           v + "post_layernorm.weight": img["Transformer/encoder_norm/scale"],
           v + "post_layernorm.bias": img["Transformer/encoder_norm/bias"],
           v + "head.probe": img["MAPHead_0/probe"], "logit_scale": arrays["params/t"]}

  def ln_mlp(theirs, ours, norm, our_norm):
    state.update({f"{theirs}{norm}.weight": img[f"{ours}{our_norm}/scale"],
                  f"{theirs}{norm}.bias": img[f"{ours}{our_norm}/bias"]})
    for i in range(2):
      state[f"{theirs}mlp.fc{i + 1}.weight"] = img[f"{ours}MlpBlock_0/Dense_{i}/kernel"].T
      state[f"{theirs}mlp.fc{i + 1}.bias"] = img[f"{ours}MlpBlock_0/Dense_{i}/bias"]

  for i in range(DEPTH):
    theirs, ours = f"{v}encoder.layers.{i}.", f"Transformer/encoderblock_{i}/"
    attention = ours + "MultiHeadDotProductAttention_0/"
    for t, o in (("q", "query"), ("k", "key"), ("v", "value"), ("out", "out")):
      state[f"{theirs}self_attn.{t}_proj.weight"] = _hf_linear(img[f"{attention}{o}/kernel"])
      state[f"{theirs}self_attn.{t}_proj.bias"] = img[f"{attention}{o}/bias"].reshape(-1)
    state[theirs + "layer_norm1.weight"] = img[ours + "LayerNorm_0/scale"]
    state[theirs + "layer_norm1.bias"] = img[ours + "LayerNorm_0/bias"]
    ln_mlp(theirs, ours, "layer_norm2", "LayerNorm_1")
  head = "MAPHead_0/MultiHeadDotProductAttention_0/"
  state[v + "head.attention.in_proj_weight"] = np.concatenate(
      [_hf_linear(img[f"{head}{n}/kernel"]) for n in ("query", "key", "value")])
  state[v + "head.attention.in_proj_bias"] = np.concatenate(
      [img[f"{head}{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
  state[v + "head.attention.out_proj.weight"] = _hf_linear(img[head + "out/kernel"])
  state[v + "head.attention.out_proj.bias"] = img[head + "out/bias"]
  ln_mlp(v + "head.", "MAPHead_0/", "layernorm", "LayerNorm_0")
  return state
