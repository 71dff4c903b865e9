"""The Swin family: forward pass against an independent NumPy Swin, the official
checkpoint layout, the methods it supports and Swin-B's parameter counts.

The NumPy model below follows the reference's PyTorch code step by step (torch
layout weights, ``x @ W.T``, windows of all images flattened image-major into
one axis, prompt copies expanded window-major, prompt outputs averaged with
``view(-1, B, P, C).mean(0)``), with the mask regions, the relative position
index and the GELU written out independently of ``vpt_jax.models.swin``.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import checkpoint_fixtures as fixtures
from test_methods import assert_only_trainable_changed
from test_methods import train_steps
from vpt_jax.checkpoints import npz
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.params import trees
from vpt_jax.methods import base
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.models import swin
from vpt_jax.params import freezing

# The tiny sizes of vpt_jax.models.swin (written out: the test's own expectation).
TINY = {
    "swin-test/4w2": dict(embed=16, depths=(2, 2), heads=(2, 4), patch=4, window=2),
    "swin-test3/4w2": dict(embed=8, depths=(2, 2, 2), heads=(1, 2, 4), patch=4, window=2),
}
EPS = 1e-5


# ---------------------------------------------------------------------------
# The official state dict, by hand.


def official_state_dict(variant: str, seed: int = 0, head_classes: int = 7) -> dict:
  """Random weights under microsoft/Swin-Transformer's names and (torch) shapes."""
  cfg = TINY[variant]
  rng = np.random.default_rng(seed)
  c, p, w = cfg["embed"], cfg["patch"], cfg["window"]
  normal = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)
  linear = lambda out, inp: normal(out, inp, scale=1.0 / math.sqrt(inp))
  sd = {
      "patch_embed.proj.weight": normal(c, 3, p, p, scale=0.3),
      "patch_embed.proj.bias": normal(c, scale=0.1),
      "patch_embed.norm.weight": 1 + normal(c, scale=0.1),
      "patch_embed.norm.bias": normal(c, scale=0.1),
  }
  num_stages = len(cfg["depths"])
  for s, (depth, heads) in enumerate(zip(cfg["depths"], cfg["heads"])):
    dim = c * 2 ** s
    for i in range(depth):
      b = f"layers.{s}.blocks.{i}."
      sd[b + "norm1.weight"] = 1 + normal(dim, scale=0.1)
      sd[b + "norm1.bias"] = normal(dim, scale=0.1)
      sd[b + "attn.relative_position_bias_table"] = normal((2 * w - 1) ** 2, heads)
      sd[b + "attn.qkv.weight"] = linear(3 * dim, dim)
      sd[b + "attn.qkv.bias"] = normal(3 * dim, scale=0.1)
      sd[b + "attn.proj.weight"] = linear(dim, dim)
      sd[b + "attn.proj.bias"] = normal(dim, scale=0.1)
      sd[b + "norm2.weight"] = 1 + normal(dim, scale=0.1)
      sd[b + "norm2.bias"] = normal(dim, scale=0.1)
      sd[b + "mlp.fc1.weight"] = linear(4 * dim, dim)
      sd[b + "mlp.fc1.bias"] = normal(4 * dim, scale=0.1)
      sd[b + "mlp.fc2.weight"] = linear(dim, 4 * dim)
      sd[b + "mlp.fc2.bias"] = normal(dim, scale=0.1)
      # Buffers the official files contain (values irrelevant to the loader).
      sd[b + "attn.relative_position_index"] = np.zeros((w * w, w * w), np.int64)
      if i % 2:
        sd[b + "attn_mask"] = np.zeros((4, w * w, w * w), np.float32)
    if s < num_stages - 1:
      sd[f"layers.{s}.downsample.reduction.weight"] = linear(2 * dim, 4 * dim)
      sd[f"layers.{s}.downsample.norm.weight"] = 1 + normal(4 * dim, scale=0.1)
      sd[f"layers.{s}.downsample.norm.bias"] = normal(4 * dim, scale=0.1)
  last = c * 2 ** (num_stages - 1)
  sd["norm.weight"] = 1 + normal(last, scale=0.1)
  sd["norm.bias"] = normal(last, scale=0.1)
  sd["head.weight"] = normal(head_classes, last)
  sd["head.bias"] = normal(head_classes)
  return sd


def random_prompts(variant: str, num_prompts: int, deep: bool, seed: int = 1) -> dict:
  """Prompt sets under our names: shallow (P, C); deep_0 (d0 - 1, P, C), deep_s (d_s, P, C_s)."""
  cfg = TINY[variant]
  rng = np.random.default_rng(seed)
  uniform = lambda *shape: rng.uniform(-1, 1, shape).astype(np.float32)
  prompts = {"shallow": uniform(num_prompts, cfg["embed"])}
  if deep:
    for s, depth in enumerate(cfg["depths"]):
      prompts[f"deep_{s}"] = uniform(depth - (s == 0), num_prompts, cfg["embed"] * 2 ** s)
  return prompts


# ---------------------------------------------------------------------------
# The NumPy Swin (the reference's PyTorch code, transcribed).


def np_layer_norm(x, weight, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPS) * weight + bias


def np_linear(x, weight, bias=None):
  y = x @ weight.T
  return y if bias is None else y + bias


def np_gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_partition(x, ws):
  """torch window_partition: (B, H, W, C) -> (B * nW, ws * ws, C), image-major."""
  b, h, w, c = x.shape
  out = []
  for image in range(b):
    for row in range(h // ws):
      for col in range(w // ws):
        out.append(x[image, row * ws:(row + 1) * ws, col * ws:(col + 1) * ws].reshape(-1, c))
  return np.stack(out)


def np_reverse(windows, ws, h, w):
  nw = (h // ws) * (w // ws)
  b, c = windows.shape[0] // nw, windows.shape[-1]
  x = np.zeros((b, h, w, c), windows.dtype)
  k = 0
  for image in range(b):
    for row in range(h // ws):
      for col in range(w // ws):
        x[image, row * ws:(row + 1) * ws, col * ws:(col + 1) * ws] = windows[k].reshape(ws, ws, c)
        k += 1
  return x


def np_relative_index(ws):
  n = ws * ws
  index = np.zeros((n, n), np.int64)
  for i in range(n):
    for j in range(n):
      dy = i // ws - j // ws + ws - 1
      dx = i % ws - j % ws + ws - 1
      index[i, j] = dy * (2 * ws - 1) + dx
  return index


def np_shift_mask(res, ws, shift):
  """(nW, n, n): -100 between tokens of different regions of the shifted map."""
  region = lambda c: 0 if c < res - ws else (1 if c < res - shift else 2)
  labels = np.array([[3 * region(y) + region(x) for x in range(res)] for y in range(res)],
                    np.float32)
  windows = np_partition(labels[None, :, :, None], ws)[:, :, 0]
  return np.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0)


def np_attention(xw, sd, prefix, heads, ws, num_prompts, mask):
  bn, n, c = xw.shape
  hd = c // heads
  qkv = np_linear(xw, sd[prefix + "qkv.weight"], sd[prefix + "qkv.bias"])
  qkv = qkv.reshape(bn, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
  attn = q @ k.transpose(0, 1, 3, 2)
  table = sd[prefix + "relative_position_bias_table"]
  bias = table[np_relative_index(ws).reshape(-1)].reshape(ws * ws, ws * ws, heads)
  bias = bias.transpose(2, 0, 1)
  padded = np.zeros((heads, n, n))
  padded[:, num_prompts:, num_prompts:] = bias
  attn = attn + padded[None]
  if mask is not None:
    nw = mask.shape[0]
    full = np.zeros((nw, n, n))
    full[:, num_prompts:, num_prompts:] = mask
    attn = (attn.reshape(bn // nw, nw, heads, n, n) + full[None, :, None]).reshape(bn, heads, n, n)
  out = (np_softmax(attn) @ v).transpose(0, 2, 1, 3).reshape(bn, n, c)
  return np_linear(out, sd[prefix + "proj.weight"], sd[prefix + "proj.bias"])


def np_block(x, sd, prefix, res, heads, ws, shift, num_prompts):
  b, _, c = x.shape
  shortcut = x
  x = np_layer_norm(x, sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"])
  prompt = x[:, :num_prompts]
  image = x[:, num_prompts:].reshape(b, res, res, c)
  if shift:
    image = np.roll(image, (-shift, -shift), axis=(1, 2))
  windows = np_partition(image, ws)
  nw = windows.shape[0] // b
  if num_prompts:
    # prompt_emb.unsqueeze(0).expand(nW, -1, -1, -1).reshape(-1, P, C)
    expanded = np.broadcast_to(prompt[None], (nw, b, num_prompts, c)).reshape(-1, num_prompts, c)
    windows = np.concatenate([expanded, windows], axis=1)
  mask = np_shift_mask(res, ws, shift) if shift else None
  out = np_attention(windows, sd, prefix + "attn.", heads, ws, num_prompts, mask)
  if num_prompts:
    prompt = out[:, :num_prompts].reshape(-1, b, num_prompts, c).mean(0)
    out = out[:, num_prompts:]
  image = np_reverse(out, ws, res, res)
  if shift:
    image = np.roll(image, (shift, shift), axis=(1, 2))
  x = image.reshape(b, res * res, c)
  if num_prompts:
    x = np.concatenate([prompt, x], axis=1)
  x = shortcut + x
  h = np_layer_norm(x, sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"])
  h = np_linear(np_gelu(np_linear(h, sd[prefix + "mlp.fc1.weight"], sd[prefix + "mlp.fc1.bias"])),
                sd[prefix + "mlp.fc2.weight"], sd[prefix + "mlp.fc2.bias"])
  return x + h


def np_merge(x, sd, prefix, res, num_prompts):
  b, _, c = x.shape
  prompt = x[:, :num_prompts]
  image = x[:, num_prompts:].reshape(b, res, res, c)
  x0, x1 = image[:, 0::2, 0::2], image[:, 1::2, 0::2]
  x2, x3 = image[:, 0::2, 1::2], image[:, 1::2, 1::2]
  merged = np.concatenate([x0, x1, x2, x3], -1).reshape(b, -1, 4 * c)
  if num_prompts:
    merged = np.concatenate([np.concatenate([prompt] * 4, -1), merged], axis=1)
  merged = np_layer_norm(merged, sd[prefix + "norm.weight"], sd[prefix + "norm.bias"])
  return np_linear(merged, sd[prefix + "reduction.weight"])


def np_swin_features(images, sd, variant, prompts=None, deep=False):
  """Pooled features (B, C_last) of the reference's (prompted) Swin in eval mode."""
  cfg = TINY[variant]
  p, ws_cfg = cfg["patch"], cfg["window"]
  b, h, _, _ = images.shape
  res = h // p
  patches = images.reshape(b, res, p, res, p, 3)
  x = np.einsum("byrxsi,oirs->byxo", patches, sd["patch_embed.proj.weight"])
  x = x + sd["patch_embed.proj.bias"]
  x = x.reshape(b, res * res, -1)
  x = np_layer_norm(x, sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
  num_prompts = 0
  if prompts is not None:
    num_prompts = prompts["shallow"].shape[0]
    x = np.concatenate([np.broadcast_to(prompts["shallow"], (b,) + prompts["shallow"].shape),
                        x], axis=1)
  num_stages = len(cfg["depths"])
  for s, (depth, heads) in enumerate(zip(cfg["depths"], cfg["heads"])):
    for i in range(depth):
      if deep and (s > 0 or i > 0):
        sets = prompts[f"deep_{s}"]
        new = sets[i - 1] if s == 0 else sets[i]
        x = np.concatenate([np.broadcast_to(new, (b,) + new.shape), x[:, num_prompts:]], axis=1)
      ws, shift = ws_cfg, (0 if i % 2 == 0 else ws_cfg // 2)
      if res <= ws:
        ws, shift = res, 0
      x = np_block(x, sd, f"layers.{s}.blocks.{i}.", res, heads, ws, shift, num_prompts)
    if s < num_stages - 1:
      x = np_merge(x, sd, f"layers.{s}.downsample.", res, num_prompts)
      res //= 2
  x = np_layer_norm(x, sd["norm.weight"], sd["norm.bias"])
  return x.mean(axis=1)


# ---------------------------------------------------------------------------
# Flax model with converted weights.


def flax_params(model, variant, image_size, sd, prompts=None):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, 3)))["params"]
  flat = {k: np.zeros(v.shape, v.dtype) for k, v in trees.flatten(shapes).items()}
  converted = swin.convert_torch(sd, variant)
  for key, value in converted.items():
    assert flat[key].shape == value.shape, key
    flat[key] = value
  for name, value in (prompts or {}).items():
    flat[f"vpt/{name}"] = value
  return trees.unflatten(flat)


def flax_features(variant, sd, images, prompts=None, deep=False, reference_order=False):
  model = swin.SwinTransformer(num_classes=5, variant=variant,
                               num_prompts=0 if prompts is None else len(prompts["shallow"]),
                               deep_prompts=deep, reference_window_order=reference_order)
  params = flax_params(model, variant, images.shape[1], sd, prompts)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, return_features=True))
  return np.asarray(apply(params, images))


@pytest.mark.numerics
# 32 px, window 2: swin-test has 16 then 4 windows (both stages shifted);
# swin-test3 has 16, 4, then one unshifted window (the 2 x 2 map equals the window).
@pytest.mark.parametrize("variant, kind", [
    ("swin-test/4w2", "none"),
    ("swin-test/4w2", "shallow"),
    ("swin-test3/4w2", "deep"),
])
def test_forward_matches_the_numpy_reference(variant, kind):
  image_size, num_prompts, batch = 32, 3, 3
  deep = kind == "deep"
  sd = official_state_dict(variant)
  prompts = None if kind == "none" else random_prompts(variant, num_prompts, deep)
  images = np.random.default_rng(2).standard_normal((batch, image_size, image_size, 3))
  images = images.astype(np.float32)
  whole_batch = np_swin_features(images.astype(np.float64), sd, variant, prompts, deep)
  one_by_one = np.concatenate([
      np_swin_features(images[i:i + 1].astype(np.float64), sd, variant, prompts, deep)
      for i in range(batch)])
  # By default every image sees and averages only its own prompts (the reference at B = 1).
  np.testing.assert_allclose(flax_features(variant, sd, images, prompts, deep), one_by_one,
                             atol=1e-4, rtol=1e-4)
  if kind == "shallow":
    # The reference's batched order mixes the images' prompt outputs ...
    assert np.abs(whole_batch - one_by_one).max() > 1e-3
    # ... and reference_window_order reproduces it.
    np.testing.assert_allclose(
        flax_features(variant, sd, images, prompts, deep, reference_order=True), whole_batch,
        atol=1e-4, rtol=1e-4)
  else:
    # Without prompts nothing mixes; with deep prompts every block's incoming prompts
    # are the same for all images and only the last stage's prompt outputs reach the
    # features, and one window there leaves nothing to mix.
    np.testing.assert_allclose(whole_batch, one_by_one, atol=1e-10)


def test_windowing_helpers_against_hand_written_ones():
  for ws in (2, 3, 7):
    np.testing.assert_array_equal(swin.relative_position_index(ws), np_relative_index(ws))
  np.testing.assert_array_equal(swin.shifted_window_mask(8, 2, 1), np_shift_mask(8, 2, 1))
  np.testing.assert_array_equal(swin.shifted_window_mask(14, 7, 3), np_shift_mask(14, 7, 3))
  # A 7 x 7 map with window 7 (Swin-B's last stage at 224 px) is one unshifted window.
  assert swin.block_window(7, 7, 1) == (7, 0)
  assert swin.block_window(14, 7, 1) == (7, 3)
  assert swin.block_window(14, 7, 0) == (7, 0)


# ---------------------------------------------------------------------------
# Conversion.

# Our name for each official per-block name, and whether the tensor is transposed.
EXPECTED_BLOCK = {
    "norm1.weight": ("norm1/scale", False), "norm1.bias": ("norm1/bias", False),
    "attn.qkv.weight": ("attn/qkv/kernel", True), "attn.qkv.bias": ("attn/qkv/bias", False),
    "attn.proj.weight": ("attn/proj/kernel", True), "attn.proj.bias": ("attn/proj/bias", False),
    "attn.relative_position_bias_table": ("attn/relative_position/bias", False),
    "norm2.weight": ("norm2/scale", False), "norm2.bias": ("norm2/bias", False),
    "mlp.fc1.weight": ("mlp/fc1/kernel", True), "mlp.fc1.bias": ("mlp/fc1/bias", False),
    "mlp.fc2.weight": ("mlp/fc2/kernel", True), "mlp.fc2.bias": ("mlp/fc2/bias", False),
}


def expected_conversion(sd: dict) -> dict:
  """Where every official tensor must land, written from the official layout."""
  expected = {
      "patch_embed/proj/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
      "patch_embed/proj/bias": sd["patch_embed.proj.bias"],
      "patch_embed/norm/scale": sd["patch_embed.norm.weight"],
      "patch_embed/norm/bias": sd["patch_embed.norm.bias"],
      "norm/scale": sd["norm.weight"], "norm/bias": sd["norm.bias"],
  }
  for key, value in sd.items():
    block = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)", key)
    if block and block.group(3) in EXPECTED_BLOCK:
      name, transpose = EXPECTED_BLOCK[block.group(3)]
      expected[f"layers_{block.group(1)}/blocks_{block.group(2)}/{name}"] = (
          value.T if transpose else value)
    merge = re.fullmatch(r"layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
                         key)
    if merge:
      name = {"reduction.weight": "reduction/kernel", "norm.weight": "norm/scale",
              "norm.bias": "norm/bias"}[merge.group(2)]
      expected[f"layers_{merge.group(1)}/downsample/{name}"] = (
          value.T if name == "reduction/kernel" else value)
  return expected


@pytest.mark.parametrize("variant", sorted(TINY))
def test_conversion_puts_every_tensor_in_place(variant):
  sd = official_state_dict(variant)
  converted = swin.convert_torch(sd, variant)
  expected = expected_conversion(sd)
  assert sorted(converted) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(converted[key], value, err_msg=key)
  # Every converted key is a backbone parameter of the model, with its shape.
  model = swin.SwinTransformer(num_classes=3, variant=variant)
  shapes = trees.flatten(jax.eval_shape(model.init, jax.random.key(0),
                                            jnp.zeros((1, 32, 32, 3)))["params"])
  backbone = {k: v.shape for k, v in shapes.items() if not k.startswith("head/")}
  assert {k: v.shape for k, v in converted.items()} == backbone
  # A "model."-prefixed dict (the .pth's "model" entry, flattened) converts alike.
  prefixed = swin.convert_torch({f"model.{k}": v for k, v in sd.items()}, variant)
  for key, value in converted.items():
    np.testing.assert_array_equal(prefixed[key], value)


def test_conversion_reports_unknown_missing_and_misshaped_keys():
  variant = "swin-test/4w2"
  sd = official_state_dict(variant)
  sd["absolute_pos_embed"] = np.zeros((1, 64, 16), np.float32)
  del sd["layers.1.blocks.1.mlp.fc2.bias"]
  sd["layers.0.downsample.reduction.weight"] = np.zeros((32, 32), np.float32)
  with pytest.raises(npz.CheckpointError) as error:
    swin.convert_torch(sd, variant)
  message = str(error.value)
  assert "absolute_pos_embed" in message and "unknown" in message
  assert "layers.1.blocks.1.mlp.fc2.bias" in message and "missing" in message
  assert "layers.0.downsample.reduction.weight: file (32, 32)" in message
  with pytest.raises(npz.CheckpointError, match="layers.2.blocks"):
    swin.convert_torch(official_state_dict("swin-test3/4w2"), variant)


# ---------------------------------------------------------------------------
# Validation.


def swin_config(method: str, variant: str = "swin-test/4w2", image_size: int = 16):
  return fixtures.method_config(method, variant, image_size, num_prompts=3,
                                **{"model.dropout_rate": 0.0})


@pytest.mark.parametrize("method", ["adapter", "cvpt", "lora", "sidetune", "e2vpt"])
def test_unsupported_methods_are_refused(method):
  with pytest.raises(ValueError, match=rf"method '{re.escape(method)}' is not defined for "
                                       r"swin backbones; choose one of linear, full"):
    factory.build_model(factory.model_spec(swin_config(method)), 5)


@pytest.mark.parametrize("change, message", [
    ({"model.image_size": 24}, "multiple of patch x window x 2\\^\\(stages - 1\\) = 16; use e.g. 32"),
    ({"model.image_size": 8}, "= 16; use e.g. 16"),
    ({"model.image_size": 220, "model.variant": "swin-B/4w7"}, "= 224; use e.g. 224"),
    ({"model.variant": "swin-X/4w7"}, "Unknown Swin variant 'swin-X/4w7'.*swin-B/4w7"),
    ({"model.variant": "swin-B/4"}, "did you mean"),
    ({"prompt.pool": "img_pool"}, "pool='original'"),
    ({"prompt.projection": 8}, "prompt.projection=-1"),
])
def test_bad_specs_are_refused_before_compute(change, message):
  config = swin_config("vpt_deep")
  for key, value in change.items():
    section, field = key.split(".")
    config[section][field] = value
  with pytest.raises(ValueError, match=message):
    factory.validate_spec(factory.model_spec(config))


def test_partial_k_follows_the_reference_swin_rules():
  # Reference (vpt.md 1.5): partial-1 = last block + norm; partial-2 = the last stage
  # + norm; partial-4 = last stage, last 2 blocks of the stage before, its downsample.
  config = swin_config("partial-1", "swin-test3/4w2", 32)
  model = factory.build_model(factory.model_spec(config), 5)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  expected = {
      "partial-1": ("layers_2/blocks_1/",),
      "partial-2": ("layers_2/",),
      "partial-4": ("layers_2/", "layers_1/blocks_0/", "layers_1/blocks_1/",
                    "layers_1/downsample/"),
  }
  for method, prefixes in expected.items():
    config.method = method
    labels = trees.flatten(freezing.label_params(shapes, factory.trainable_rules(config)))
    trained = {k for k, v in labels.items() if v == freezing.TRAIN}
    want = {k for k in labels if k.startswith(prefixes + ("norm/", "head/"))}
    assert trained == want, method


def test_bias_trains_every_name_with_bias_like_the_reference():
  config = swin_config("bias")
  model = factory.build_model(factory.model_spec(config), 5)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  labels = trees.flatten(freezing.label_params(shapes, factory.trainable_rules(config)))
  # torch names containing "bias" (the reference's rule) <-> our trainable backbone leaves.
  torch_bias = {key for key in swin.torch_layout("swin-test/4w2") if "bias" in key}
  ours = {swin.torch_layout("swin-test/4w2")[key][0].split(":")[0] for key in torch_bias}
  assert {k for k, v in labels.items() if v == freezing.TRAIN and not k.startswith("head/")} == ours
  assert "layers_1/blocks_0/attn/relative_position/bias" in ours


def test_drop_path_acts_only_when_the_backbone_trains():
  sd = official_state_dict("swin-test/4w2")
  images = np.random.default_rng(4).standard_normal((4, 16, 16, 3)).astype(np.float32)
  model = swin.SwinTransformer(num_classes=5, variant="swin-test/4w2", drop_path_rate=0.5,
                               backbone_dropout=True)
  params = flax_params(model, "swin-test/4w2", 16, sd)
  frozen = model.clone(backbone_dropout=False)  # every method but full

  @jax.jit
  def features(p, x):
    run = lambda m, key, train: m.apply({"params": p}, x, train=train, return_features=True,
                                        rngs={"dropout": jax.random.key(key)})
    return run(model, 1, True), run(model, 2, True), run(frozen, 1, True)

  first, second, frozen_train = map(np.asarray, features(params, images))
  assert np.abs(first - second).max() > 1e-3
  # A frozen backbone in training mode is the deterministic (eval) Swin.
  np.testing.assert_allclose(frozen_train, np_swin_features(images.astype(np.float64), sd,
                                                            "swin-test/4w2"), atol=1e-4)


# ---------------------------------------------------------------------------
# Prompts: init and dropout.


def test_prompt_init_uses_the_stage0_bound_for_every_stage():
  size = swin.SWIN_SIZES["B"]
  module = swin.SwinPrompts(4, size.widths, size.depths, patch_size=4, deep=True)
  params = jax.jit(lambda: module.init(jax.random.key(0), 2, train=False))()["params"]
  bound = 0.1846372  # vpt.md 1.3: sqrt(6 / (3 * 4 * 4 + 128))
  for name, value in params.items():
    assert np.abs(value).max() <= bound + 1e-7, name
    assert np.abs(value).max() > 0.9 * bound, name
  assert {k: v.shape for k, v in params.items()} == {
      "shallow": (4, 128), "deep_0": (1, 4, 128), "deep_1": (2, 4, 256),
      "deep_2": (18, 4, 512), "deep_3": (2, 4, 1024)}


def test_prompt_dropout_masks_shallow_per_example_and_deep_per_stage():
  module = swin.SwinPrompts(6, (8, 16), (2, 2), patch_size=4, deep=True, dropout_rate=0.5)
  variables = module.init(jax.random.key(0), 4, train=False)
  shallow, blocks = jax.jit(lambda v: module.apply(v, 4, train=True,
                                                   rngs={"dropout": jax.random.key(3)}))(variables)
  shallow = np.asarray(shallow)
  # Shallow: broadcast first, then dropout -> different masks per example.
  assert not all(np.array_equal(shallow[0] == 0, shallow[i] == 0) for i in range(1, 4))
  # Deep: dropout on the stage tensor, then broadcast -> one mask for the batch.
  assert blocks[0][0] is None and len(blocks[0]) == 2 and len(blocks[1]) == 2
  for stage in blocks:
    for block in stage[1:] if stage[0] is None else stage:
      block = np.asarray(block)
      assert (block == 0).any()
      for i in range(1, 4):
        np.testing.assert_array_equal(block[i], block[0])


# ---------------------------------------------------------------------------
# Training every supported method on the tiny model.

# The tiny model: widths 16 and 32, 3 prompts, 5 classes.
D0, D1, CLASSES, P = 16, 32, 5, 3
HEAD = D1 * CLASSES + CLASSES
STEPS = 4
# Small enough that 4 steps on one batch lower the loss for every method.
LEARNING_RATES = {"sgd": 0.01, "adamw": 0.01}
# Each compile of a Swin train step costs seconds, so these train for real: the
# head-only methods, full (every backbone parameter must get a gradient) and vpt+bias
# (every prompt set, the shallow one included, and every bias). partial-k, bias,
# vpt_shallow and vpt_deep differ from them only in their trainable sets, which
# test_trainable_sets_follow_the_closed_form checks exactly.
TRAINED_METHODS = ("linear", "mlp-3", "full", "vpt+bias")
_RUNS = {}
_FEATURES = {}


def initial_variables(model, method: base.Method, backbone: dict) -> dict:
  """The model's variables: the converted backbone, the head's own init, prompts
  U(-0.3, 0.3) (compiling only the head's init keeps the test fast)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  head = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, D1)),
                                    from_features=True))()
  rng = np.random.default_rng(7)
  flat = {}
  for key, value in trees.flatten(shapes["params"]).items():
    if key.startswith("head/"):
      flat[key] = np.asarray(trees.flatten(head["params"])[key])
    elif key.startswith("vpt/"):
      flat[key] = rng.uniform(-0.3, 0.3, value.shape).astype(np.float32)
    else:
      flat[key] = np.zeros(value.shape, value.dtype)  # replaced by the backbone below
  params = npz.merge_backbone(trees.unflatten(flat), backbone, fresh=method.fresh_patterns)
  return {"params": params, **({"batch_stats": head["batch_stats"]} if "batch_stats" in head
                               else {})}


def trained(method_name: str) -> dict:
  """Builds a method's model, loads the tiny official-layout backbone, trains STEPS steps.

  Head-only methods train on cached backbone features, as the trainer does
  (``config.cache_features``).
  """
  if method_name in _RUNS:
    return _RUNS[method_name]
  config = swin_config(method_name)
  method = registry.get_method(method_name)
  model = factory.build_model(factory.model_spec(config), CLASSES)
  backbone = swin.convert_torch(official_state_dict("swin-test/4w2", seed=5), "swin-test/4w2")
  variables = initial_variables(model, method, backbone)
  params = variables["params"]
  labels = freezing.label_params(params, factory.trainable_rules(config))
  name = config.optim.name or method.optimizer
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  batch = {"image": images, "label": rng.integers(0, CLASSES, (8,)).astype(np.int32)}
  normalization = dict(mean=(0.5,) * 3, std=(0.25,) * 3)
  # The trainer's uses_cached_features: only head/ trains and nothing is stochastic.
  if all(path.startswith("head/") for path, label in trees.flatten(labels).items()
         if label == freezing.TRAIN):
    if "features" not in _FEATURES:
      _FEATURES["features"] = np.asarray(jax.jit(
          lambda p, x: model.apply({"params": p}, x, return_features=True))(
              params, normalization_lib.normalize_images(images, **normalization)))
    batch = {"features": _FEATURES["features"], "label": batch["label"]}
  initial, state, losses = train_steps(
      model, params, labels, batch, optimizer=name, learning_rate=LEARNING_RATES[name],
      weight_decay=config.optim.weight_decay, normalization=normalization, num_steps=STEPS,
      batch_stats=variables.get("batch_stats"))
  _RUNS[method_name] = dict(initial=initial, state=state, labels=labels, losses=losses,
                            backbone=backbone)
  return _RUNS[method_name]


def _block_params(dim, heads):
  """norm1, qkv, proj, relative position table (window 2: 9 rows), norm2, fc1, fc2."""
  return 2 * dim + 3 * dim * dim + 3 * dim + dim * dim + dim + 9 * heads + 2 * dim \
      + 4 * dim * dim + 4 * dim + 4 * dim * dim + dim


def _block_biases(dim, heads):
  return dim + 3 * dim + dim + 9 * heads + dim + 4 * dim + dim


BACKBONE = (3 * 16 * D0 + D0 + 2 * D0 + 2 * _block_params(D0, 2)
            + 8 * D0 + 4 * D0 * D1 + 2 * _block_params(D1, 4) + 2 * D1)
EXPECTED_TRAINABLE = {
    "linear": HEAD,
    "full": BACKBONE + HEAD,
    "partial-1": _block_params(D1, 4) + 2 * D1 + HEAD,
    "partial-2": 2 * _block_params(D1, 4) + 2 * D1 + HEAD,  # the last stage (no merge after)
    "mlp-3": 2 * (D1 * D1 + D1 + 2 * D1) + HEAD,
    "bias": D0 + D0 + 2 * _block_biases(D0, 2) + 4 * D0 + 2 * _block_biases(D1, 4) + D1 + HEAD,
    "vpt_shallow": P * D0 + HEAD,
    "vpt_deep": P * (D0 + D0 + 2 * D1) + HEAD,
}
EXPECTED_TRAINABLE["vpt+bias"] = (EXPECTED_TRAINABLE["vpt_deep"] + EXPECTED_TRAINABLE["bias"]
                                  - HEAD)
# The methods' own parameters next to the backbone and the output layer.
OWN_PARAMS = {"mlp-3": EXPECTED_TRAINABLE["mlp-3"] - HEAD, "vpt_shallow": P * D0,
              "vpt_deep": P * (D0 + D0 + 2 * D1), "vpt+bias": P * (D0 + D0 + 2 * D1)}


@pytest.mark.parametrize("method", sorted(EXPECTED_TRAINABLE))
def test_trainable_sets_follow_the_closed_form(method):
  config = swin_config(method)
  model = factory.build_model(factory.model_spec(config), CLASSES)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  labels = freezing.label_params(shapes, factory.trainable_rules(config))
  trainable, frozen = freezing.split(shapes, labels)
  assert freezing.count(trainable) == EXPECTED_TRAINABLE[method]
  assert freezing.count(trainable) + freezing.count(frozen) == (
      BACKBONE + HEAD + OWN_PARAMS.get(method, 0))


@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_each_method_trains_only_its_parameters(method):
  run = trained(method)
  assert all(np.isfinite(run["losses"])) and run["losses"][-1] < run["losses"][0], run["losses"]
  before = trees.flatten(run["initial"]["params"])
  labels = trees.flatten(run["labels"])
  assert_only_trainable_changed(before, trees.flatten(run["state"]["params"]),
                                lambda path: labels[path] == freezing.TRAIN)
  trainable, _ = freezing.split(run["state"]["params"], run["labels"])
  assert freezing.count(trainable) == EXPECTED_TRAINABLE[method]
  # The backbone came from the converted official weights.
  for key, value in run["backbone"].items():
    np.testing.assert_array_equal(before[key], value, err_msg=key)
  assert freezing.count(run["backbone"]) == BACKBONE


# ---------------------------------------------------------------------------
# Swin-B at 224 px, shapes only.


def test_swin_b_vpt_deep_counts_follow_the_closed_form():
  num_prompts, num_classes = 10, 100
  config = swin_config("vpt_deep", "swin-B/4w7", 224)
  config.prompt.num_prompts = num_prompts
  model = factory.build_model(factory.model_spec(config), num_classes)
  shapes = factory.variable_shapes(model, 224)["params"]
  flat = trees.flatten(shapes)
  count = lambda keys: sum(int(np.prod(flat[k].shape)) for k in keys)
  # One prompt set per block: 2 blocks at 128, 2 at 256, 18 at 512, 2 at 1024 channels.
  prompts = num_prompts * (2 * 128 + 2 * 256 + 18 * 512 + 2 * 1024)
  assert prompts == num_prompts * 12032
  assert count(k for k in flat if k.startswith("vpt/")) == prompts
  labels = trees.flatten(freezing.label_params(shapes, factory.trainable_rules(config)))
  assert count(k for k, v in labels.items() if v == freezing.TRAIN) == (
      prompts + 1024 * num_classes + num_classes)

  def block(c, heads):  # 12 C^2 + 13 C weights and biases, a 13 x 13 table per head
    return 12 * c * c + 13 * c + 169 * heads

  def merge(c):  # LayerNorm(4C) and the bias-free 4C -> 2C reduction
    return 8 * c + 8 * c * c

  backbone = (3 * 16 * 128 + 128 + 2 * 128
              + 2 * block(128, 4) + merge(128) + 2 * block(256, 8) + merge(256)
              + 18 * block(512, 16) + merge(512) + 2 * block(1024, 32) + 2 * 1024)
  # timm's swin_base_patch4_window7_224 (1000 classes) has 87,768,224 parameters.
  assert backbone == 87_768_224 - (1024 * 1000 + 1000) == 86_743_224
  assert count(k for k in flat if not k.startswith(("vpt/", "head/"))) == backbone
