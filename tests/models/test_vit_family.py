"""vit_family: the official MAE / MoCo v3 / timm PyTorch checkpoints converted key by key,
and the official ViT-L/16 and ViT-H/14 ImageNet-21k .npz layouts (vpt.md 1.1-1.2, 1.8, 3).

The checkpoints are the ones ``flavour_fixtures`` writes in the official key layouts;
the expected values are spelt out index by index.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import torch_fixtures as tf
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import vit_layouts
from vpt_jax.params.trees import flatten
from vpt_jax.methods import factory
from vpt_jax.methods import prompts
from vpt_jax.models import prompts as prompts_lib
from vpt_jax.models import vit
from vpt_jax.models import vit_family

from flavour_fixtures import D, DEPTH, HEADS, HEAD_DIM, IMAGE, MLP, PATCH, POSEMB
from flavour_fixtures import flavour_spec as _spec
from flavour_fixtures import official_state_dict, write_official_file

# --------------------------------------------------------------------------
# Conversion of the official checkpoints.


def _assert_converted(converted, state, flavour):
  """Every converted tensor against the official one, index by index."""
  np.testing.assert_array_equal(converted["cls"], state["cls_token"])
  np.testing.assert_array_equal(converted[POSEMB[flavour]], state["pos_embed"])
  conv = state["patch_embed.proj.weight"]  # (out, in, kh, kw)
  kernel = converted["embedding/kernel"]  # (kh, kw, in, out)
  assert kernel.shape == (PATCH, PATCH, 3, D)
  for kh, kw, c, o in np.ndindex(kernel.shape):
    assert kernel[kh, kw, c, o] == conv[o, c, kh, kw]
  for i in range(DEPTH):
    b, ours = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    attention = ours + "MultiHeadDotProductAttention_0/"
    qkv, qkv_bias = state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]
    for which, name in enumerate(("query", "key", "value")):
      kernel, bias = converted[f"{attention}{name}/kernel"], converted[f"{attention}{name}/bias"]
      assert kernel.shape == (D, HEADS, HEAD_DIM) and bias.shape == (HEADS, HEAD_DIM)
      for x_index, h, d in np.ndindex(kernel.shape):
        # timm: the fused output (3, heads, head_dim) row-major, W is (out, in).
        assert kernel[x_index, h, d] == qkv[which * D + h * HEAD_DIM + d, x_index]
      for h, d in np.ndindex(bias.shape):
        assert bias[h, d] == qkv_bias[which * D + h * HEAD_DIM + d]
    out_kernel, proj = converted[attention + "out/kernel"], state[b + "attn.proj.weight"]
    assert out_kernel.shape == (HEADS, HEAD_DIM, D)
    for h, d, o in np.ndindex(out_kernel.shape):
      assert out_kernel[h, d, o] == proj[o, h * HEAD_DIM + d]
    np.testing.assert_array_equal(converted[attention + "out/bias"], state[b + "attn.proj.bias"])
    for norm, ln in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
      np.testing.assert_array_equal(converted[f"{ours}{ln}/scale"], state[f"{b}{norm}.weight"])
      np.testing.assert_array_equal(converted[f"{ours}{ln}/bias"], state[f"{b}{norm}.bias"])
    for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      np.testing.assert_array_equal(converted[f"{ours}MlpBlock_0/{dense}/kernel"],
                                    state[f"{b}mlp.{fc}.weight"].T)
      np.testing.assert_array_equal(converted[f"{ours}MlpBlock_0/{dense}/bias"],
                                    state[f"{b}mlp.{fc}.bias"])
  if flavour == "mae":  # norm dropped, a fresh fc_norm (LayerNorm's init)
    np.testing.assert_array_equal(converted["fc_norm/scale"], np.ones(D))
    np.testing.assert_array_equal(converted["fc_norm/bias"], np.zeros(D))
    assert not any("encoder_norm" in k for k in converted)
  else:
    np.testing.assert_array_equal(converted["Transformer/encoder_norm/scale"],
                                  state["norm.weight"])
    np.testing.assert_array_equal(converted["Transformer/encoder_norm/bias"], state["norm.bias"])
  assert not any(k.startswith("head") for k in converted)
  assert len(converted) == 4 + DEPTH * 16 + 2


@pytest.mark.parametrize("flavour, filename", [("mae", "mae_pretrain_vit_base.pth"),
                                               ("moco", "linear-vit-b-300ep.pth.tar")])
def test_official_checkpoints_convert_and_load_every_tensor(flavour, filename, tmp_path):
  path = tmp_path / filename
  state = write_official_file(flavour, path)
  variant = f"{flavour}-test/{PATCH}"
  converted, source = factory.read_backbone_file(str(path), variant)
  assert "PyTorch" in source
  _assert_converted(converted, state, flavour)
  # Strict merge: every backbone leaf of the model comes from the file.
  spec = _spec("vpt_deep", variant)
  model = factory.build_model(spec, 3)
  init = fixtures.make_model_params(model, IMAGE)
  loaded = flatten(factory.load_pretrained(init, spec, str(path)))
  for key, value in flatten(init).items():
    if key.startswith(("vpt/", "head/")):
      np.testing.assert_array_equal(loaded[key], value)
    else:
      np.testing.assert_array_equal(loaded[key], converted[key], err_msg=key)


def test_moco_pretraining_checkpoint_keeps_the_base_encoder():
  state = official_state_dict("moco")
  state.pop("head.weight"), state.pop("head.bias")
  pretraining = {f"module.base_encoder.{k}": v for k, v in state.items()}
  pretraining.update({f"module.momentum_encoder.{k}": v + 1 for k, v in state.items()})
  pretraining["module.predictor.0.weight"] = np.zeros((4, D), np.float32)
  pretraining["module.base_encoder.head.0.weight"] = np.zeros((4, D), np.float32)  # MLP head
  converted = vit_family.convert_torch(pretraining, f"moco-test/{PATCH}")
  _assert_converted(converted, state, "moco")


def test_supervised_timm_vits_convert_to_the_usual_names():
  state = official_state_dict("moco")  # timm names, a classifier head
  state["pre_logits.fc.weight"] = np.zeros((D, D), np.float32)  # timm's 21k layer
  converted = vit_family.convert_torch(state, f"test/{PATCH}")
  np.testing.assert_array_equal(converted[vit_layouts.POSEMB_KEY], state["pos_embed"])
  np.testing.assert_array_equal(converted["Transformer/encoder_norm/scale"],
                                state["norm.weight"])
  assert not any(k.startswith(("head", "pre_logits")) for k in converted)


def test_safetensors_files_convert_too(tmp_path):
  state = official_state_dict("mae")
  path = tmp_path / "mae.safetensors"
  tf.write_safetensors([(k, "F32", v.shape, v.tobytes()) for k, v in state.items()], path)
  converted, _ = factory.read_backbone_file(str(path), f"mae-test/{PATCH}")
  _assert_converted(converted, state, "mae")


def test_missing_unexpected_and_misshapen_tensors_are_named():
  state = official_state_dict("moco")
  del state["blocks.1.attn.qkv.bias"]
  state["blocks.2.norm1.weight"] = np.ones(D, np.float32)  # a deeper model's block
  state["dist_token"] = np.zeros((1, 1, D), np.float32)
  state["blocks.0.mlp.fc1.weight"] = np.zeros((MLP + 1, D), np.float32)
  with pytest.raises(npz.CheckpointMismatchError) as info:
    vit_family.convert_torch(state, f"moco-test/{PATCH}")
  error = info.value
  assert error.missing == ["blocks.1.attn.qkv.bias"]
  assert error.unexpected == ["blocks.2.norm1.weight", "dist_token"]
  assert error.mismatched == [("blocks.0.mlp.fc1.weight", (MLP + 1, D), (MLP, D))]
  message = str(error)
  for name in ("blocks.1.attn.qkv.bias", "dist_token", "blocks.0.mlp.fc1.weight", "3 blocks"):
    assert name in message
  # A base-size file for a test-size variant: width named, nothing reshaped.
  with pytest.raises(npz.CheckpointMismatchError, match="width 16"):
    vit_family.convert_torch(official_state_dict("mae"), "mae-S/4")


# --------------------------------------------------------------------------
# ViT-L/16 and ViT-H/14 ImageNet-21k .npz files (vpt.md 1.1, 1.2, 3): the
# official names and shapes, written from the tables, against what the model
# expects, on shapes only (no 300M / 600M floats are allocated).

OFFICIAL_SIZES = {  # file: (patch, width, MLP, heads, layers)
    "imagenet21k_ViT-L_16.npz": ("L/16", 16, 1024, 4096, 16, 24),
    "imagenet21k_ViT-H_14.npz": ("H/14", 14, 1280, 5120, 16, 32),
}


def official_21k_layout(patch, width, mlp, heads, layers, image=224):
  """The released file's keys and shapes (pre-Linen names, 21k head, pre_logits)."""
  head_dim = width // heads
  shapes = {
      "embedding/kernel": (patch, patch, 3, width), "embedding/bias": (width,),
      "cls": (1, 1, width),
      "Transformer/posembed_input/pos_embedding": (1, 1 + (image // patch) ** 2, width),
      "Transformer/encoder_norm/scale": (width,), "Transformer/encoder_norm/bias": (width,),
      "head/kernel": (width, 21843), "head/bias": (21843,),
      "pre_logits/kernel": (width, width), "pre_logits/bias": (width,),
  }
  for i in range(layers):
    block = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      shapes[f"{block}{ln}/scale"] = shapes[f"{block}{ln}/bias"] = (width,)
    for name in ("query", "key", "value"):
      shapes[f"{block}MultiHeadDotProductAttention_1/{name}/kernel"] = (width, heads, head_dim)
      shapes[f"{block}MultiHeadDotProductAttention_1/{name}/bias"] = (heads, head_dim)
    shapes[f"{block}MultiHeadDotProductAttention_1/out/kernel"] = (heads, head_dim, width)
    shapes[f"{block}MultiHeadDotProductAttention_1/out/bias"] = (width,)
    shapes[f"{block}MlpBlock_3/Dense_0/kernel"] = (width, mlp)
    shapes[f"{block}MlpBlock_3/Dense_0/bias"] = (mlp,)
    shapes[f"{block}MlpBlock_3/Dense_1/kernel"] = (mlp, width)
    shapes[f"{block}MlpBlock_3/Dense_1/bias"] = (width,)
  return {key: jax.ShapeDtypeStruct(shape, jnp.float32) for key, shape in shapes.items()}


@pytest.mark.parametrize("filename", list(OFFICIAL_SIZES))
def test_large_21k_npz_layouts_match_the_model(filename):
  variant, patch, width, mlp, heads, layers = OFFICIAL_SIZES[filename]
  official = official_21k_layout(patch, width, mlp, heads, layers)
  # The layout functions only read names: they run on shape-only leaves.
  layout = vit_layouts.detect_layout(official)
  assert layout == "vit_raw"
  converted = vit_layouts.to_model_layout(official, layout)
  model = vit.VisionTransformer(num_classes=10, variant=variant,
                                hooks=prompts.VptOptions(50, deep=True))
  expected = {key: leaf for key, leaf in flatten(fixtures.param_shapes(model, 224)).items()
              if not key.startswith(("head/", "vpt/"))}
  assert sorted(converted) == sorted(expected)
  for key, leaf in expected.items():
    assert tuple(converted[key].shape) == tuple(leaf.shape), key
  # The backbone's size (no head): the counts the tables imply.
  count = sum(math.prod(leaf.shape) for leaf in expected.values())
  tokens = 1 + (224 // patch) ** 2
  per_block = 4 * width + 4 * (width * width + width) + 2 * width * mlp + mlp + width
  assert count == patch * patch * 3 * width + width + width + tokens * width + \
      layers * per_block + 2 * width
  # The reference's prompt init bound for these widths (vpt.md 1.3).
  bound = {"L/16": 0.0578638, "H/14": 0.0566744}[variant]
  assert prompts_lib.prompt_init_bound(patch, width) == pytest.approx(bound, abs=1e-7)
