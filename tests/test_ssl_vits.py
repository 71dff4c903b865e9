"""MAE and MoCo v3 ViTs (vpt.md 1.8): their PyTorch checkpoints, forward, methods,
and the official ViT-L/16 and ViT-H/14 ImageNet-21k .npz layouts (vpt.md 1.1-1.2, 3).

The checkpoints are written in the official key layouts (timm names: MAE's
``{"model": ...}`` with the encoder's ``norm``, MoCo v3's linear-probe
``{"state_dict": {"module.*"}, "epoch", ...}`` with a classifier ``head``) in
torch's zip format by ``torch_fixtures``; the expected values are spelt out
index by index, and the forward is recomputed in NumPy float64.
"""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
import checkpoint_fixtures as fixtures
import numpy_vit
import torch_fixtures as tf
from test_methods import train_steps
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import vit_layouts
from vpt_jax.params.trees import flatten, unflatten
from vpt_jax.methods import factory
from vpt_jax.methods import prompts
from vpt_jax.methods import registry
from vpt_jax.models import prompts as prompts_lib
from vpt_jax.models import position_embeddings
from vpt_jax.models import vit_variants
from vpt_jax.models import vit
from vpt_jax.models import vit_family
from vpt_jax.params import freezing
from vpt_jax.params import trees

# "test" size: width 16, MLP 32, 2 heads of 8, 2 blocks; 16 px images, 4 px patches.
D, MLP, HEADS, HEAD_DIM, DEPTH, PATCH, IMAGE = 16, 32, 2, 8, 2, 4, 16
GRID = IMAGE // PATCH
TOLERANCE = tolerances.FORWARD_VS_NUMPY
MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
POSEMB = {"mae": "Transformer/posembed_input/pos_embedding",
          "moco": "Transformer/posembed_fixed/pos_embedding"}


def official_state_dict(flavour: str, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tensors under the official timm names and (out, in) shapes."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: (0.5 * rng.standard_normal(shape)).astype(np.float32)
  state = {"cls_token": r(1, 1, D), "pos_embed": r(1, 1 + GRID * GRID, D),
           "patch_embed.proj.weight": r(D, 3, PATCH, PATCH), "patch_embed.proj.bias": r(D)}
  for i in range(DEPTH):
    b = f"blocks.{i}."
    state.update({
        b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
        b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
        b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
        b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
        b + "mlp.fc1.weight": r(MLP, D), b + "mlp.fc1.bias": r(MLP),
        b + "mlp.fc2.weight": r(D, MLP), b + "mlp.fc2.bias": r(D)})
  # MAE's pretrained encoder keeps its final norm (the reference deletes it);
  # MoCo v3's linear-probe checkpoint has the norm and the 1000-class head.
  state["norm.weight"], state["norm.bias"] = 1 + r(D), r(D)
  if flavour == "moco":
    state["head.weight"], state["head.bias"] = r(10, D), r(10)
  return state


def write_official_file(flavour: str, path, seed: int = 0) -> dict[str, np.ndarray]:
  """Writes the flavour's checkpoint container in torch's zip format; returns the tensors."""
  state = official_state_dict(flavour, seed)
  tensors = collections.OrderedDict(
      (name, tf.tensor_of(value, str(i))) for i, (name, value) in enumerate(state.items()))
  if flavour == "mae":  # mae_pretrain_vit_base.pth: {"model": state_dict}
    tf.write_torch_zip({"model": tensors}, path, archive="mae_pretrain_vit_base")
  else:  # linear-vit-b-300ep.pth.tar (main_lincls.py), DistributedDataParallel names
    momentum = tf.tensor_of(np.zeros(3, np.float32), "m")
    tf.write_torch_zip({"epoch": 90, "arch": "vit_base",
                        "state_dict": collections.OrderedDict(
                            ("module." + k, v) for k, v in tensors.items()),
                        "best_acc1": tf.tensor_of(np.array(76.7, np.float32), "acc"),
                        "optimizer": {"state": {0: {"momentum_buffer": momentum}},
                                      "param_groups": [{"lr": 0.1, "params": [0]}]}}, path)
  return state


# --------------------------------------------------------------------------
# Variants and the fixed position embeddings.


def test_variant_prefixes_select_the_flavour():
  for variant, flavour in [("mae-B/16", "mae"), ("moco-B/16", "moco"), ("B/16", ""),
                           ("mae-L/16", "mae"), ("mae-test/4", "mae")]:
    assert vit_variants.variant_flavour(variant) == flavour
  assert vit_variants.decode_variant("mae-H/14") == (vit_variants.VIT_SIZES["H"], 14)
  assert vit_variants.decode_variant("moco-B/16") == vit_variants.decode_variant("B/16")
  with pytest.raises(ValueError, match="mae-B/16"):
    vit_variants.decode_variant("simclr-B/16")


@pytest.mark.parametrize("rows_first", [True, False])
def test_sincos_embedding_matches_the_closed_form(rows_first):
  side, width = 3, 16
  table = position_embeddings.sincos_posemb(side, width, rows_first)
  assert table.shape == (1, 1 + side * side, width) and table.dtype == np.float32
  np.testing.assert_array_equal(table[0, 0], 0.0)  # the CLS row
  quarter = width // 4
  for t in range(side * side):
    row, col = t // side, t % side
    first, second = (row, col) if rows_first else (col, row)
    for k in range(quarter):
      omega = 10000.0 ** (-k / quarter)
      expected = [math.sin(first * omega), math.cos(first * omega),
                  math.sin(second * omega), math.cos(second * omega)]
      got = [table[0, 1 + t, k + j * quarter] for j in range(4)]
      np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_flavour_layouts_follow_the_official_meshgrids():
  # MoCo v3 builds its grid with torch.meshgrid(grid_w, grid_h) ("ij" indexing)
  # and encodes the flattened first output first; MAE uses np.meshgrid(grid_w,
  # grid_h) ("xy" indexing) and encodes grid[0] first. For token t = r * S + c:
  side = 5
  moco_first = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")[0].reshape(-1)
  mae_first = np.meshgrid(np.arange(side), np.arange(side))[0].reshape(-1)
  tokens = np.arange(side * side)
  np.testing.assert_array_equal(moco_first, tokens // side)  # the row
  np.testing.assert_array_equal(mae_first, tokens % side)  # the column
  assert vit_variants.FLAVOUR_POSEMB["moco"][1] == "sincos_rows_first"
  assert vit_variants.FLAVOUR_POSEMB["mae"][1] == "sincos_columns_first"


@pytest.mark.parametrize("flavour, rows_first", [("mae", False), ("moco", True)])
def test_from_scratch_models_start_from_their_sincos_embedding(flavour, rows_first):
  model = vit.VisionTransformer(num_classes=3, variant=f"{flavour}-test/{PATCH}")
  names = flatten(fixtures.param_shapes(model, IMAGE))
  assert POSEMB[flavour] in names
  assert any("encoder_norm" in n for n in names) == (flavour == "moco")
  assert ("fc_norm/scale" in names) == (flavour == "mae")
  init_scheme = vit_variants.FLAVOUR_POSEMB[flavour][1]
  posemb = position_embeddings.AddPositionEmbs(init_scheme).init(
      jax.random.key(0), jnp.zeros((1, 1 + GRID * GRID, D)))["params"]["pos_embedding"]
  np.testing.assert_array_equal(posemb, position_embeddings.sincos_posemb(GRID, D, rows_first))


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
# Forward against NumPy.


def _spec(method, variant, **overrides):
  spec = dict(method=method, variant=variant, image_size=IMAGE, dropout_rate=0.0,
              skip_dead_work=True, dtype="float32", num_prompts=0, prompt_dropout=0.0,
              prompt_projection=-1, pool="original")
  if registry.get_method(method).uses_prompts:
    spec.update(num_prompts=3)
  spec.update(overrides)
  return spec


def _apply(model, params, images, rng=None, **kwargs):
  """``model.apply`` under jit (one compile is cheaper than op-by-op dispatch)."""
  rngs = None if rng is None else {"dropout": rng}
  return np.asarray(jax.jit(lambda p, x, r: model.apply({"params": p}, x, rngs=r, **kwargs))(
      params, images, rngs))


def numpy_mae_features(params, images, pool="original"):
  """MAE's forward_features with prompts (KMnP/vpt vit_prompt/vit_mae.py), float64.

  Patch embedding + CLS + position embedding, prompts after CLS (deep: replaced
  before every later block), the blocks, no final norm, then fc_norm of the
  mean over the non-CLS tokens ("original": prompts and patches).
  """
  p = numpy_vit._f64(params)  # pylint: disable=protected-access
  transformer = p["Transformer"]
  x = numpy_vit.patch_embed(np.asarray(images, np.float64), p["embedding"]["kernel"],
                            p["embedding"]["bias"])
  batch = x.shape[0]
  x = np.concatenate([np.broadcast_to(p["cls"], (batch, 1, D)), x], axis=1)
  x = x + transformer["posembed_input"]["pos_embedding"]
  sets = numpy_vit.prompt_sets(p["vpt"]) if "vpt" in p else []
  num_prompts = len(sets[0]) if sets else 0
  if sets:
    x = np.concatenate([x[:, :1], np.broadcast_to(sets[0], (batch,) + sets[0].shape),
                        x[:, 1:]], axis=1)
  for layer in range(DEPTH):
    if layer and len(sets) > 1:
      x = x.copy()
      x[:, 1:1 + num_prompts] = sets[layer]
    x = numpy_vit.encoder_block(x, transformer[f"encoderblock_{layer}"])
  pooled = {"original": x[:, 1:], "img_pool": x[:, 1 + num_prompts:],
            "prompt_pool": x[:, 1:1 + num_prompts]}[pool].mean(axis=1)
  return numpy_vit.layer_norm(pooled, p["fc_norm"]["scale"], p["fc_norm"]["bias"])


@pytest.mark.numerics
@pytest.mark.parametrize("method, pool, skip_dead_work", [
    ("vpt_deep", "original", True), ("vpt_deep", "original", False),
    ("vpt_shallow", "original", True), ("vpt_deep", "img_pool", True),
    ("linear", "original", True)])
def test_mae_features_average_every_token_through_fc_norm(method, pool, skip_dead_work):
  spec = _spec(method, f"mae-test/{PATCH}", pool=pool, skip_dead_work=skip_dead_work)
  model = factory.build_model(spec, 4)
  params = fixtures.make_model_params(model, IMAGE, seed=7)  # fc_norm random too
  images = np.random.default_rng(1).uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
  logits = _apply(model, params, images)
  expected = numpy_mae_features(params, images, pool)
  head = numpy_vit._f64(params["head"])  # pylint: disable=protected-access
  np.testing.assert_allclose(logits, numpy_vit.head_forward(head, expected), **TOLERANCE)


@pytest.mark.numerics
def test_moco_forward_is_cls_after_the_final_norm():
  spec = _spec("vpt_deep", f"moco-test/{PATCH}")
  model = factory.build_model(spec, 4)
  params = fixtures.make_model_params(model, IMAGE, seed=8)
  images = np.random.default_rng(2).uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
  logits = _apply(model, params, images)
  # numpy_vit is the supervised ViT: same math, its posemb under the usual name.
  renamed = flatten(params)
  renamed["Transformer/posembed_input/pos_embedding"] = renamed.pop(POSEMB["moco"])
  np.testing.assert_allclose(logits, numpy_vit.vit_forward(unflatten(renamed), images),
                             **TOLERANCE)


# --------------------------------------------------------------------------
# Methods: trainable sets, training, the fixed MoCo embedding.

# Hand-written: what each method trains on a 2-block model (plus the head).
TRAINED = {
    "linear": (),
    "mlp-3": (),
    "partial-1": (r"Transformer/encoderblock_1/.*", "FINAL_NORM"),
    "bias": (r".*bias",),
    "vpt_shallow": (r"vpt/.*",),
    "vpt_deep": (r"vpt/.*",),
    "adapter": (r"Transformer/encoderblock_\d/adapter/.*",),
    "cvpt": (r"cvpt/.*",),
    "full": (r".*",),
}


@pytest.mark.parametrize("flavour", ["mae", "moco"])
@pytest.mark.parametrize("method", list(TRAINED))
def test_every_vit_method_builds_and_trains_the_right_parameters(flavour, method):
  config = fixtures.method_config(method, f"{flavour}-test/{PATCH}", IMAGE,
                                  **{"adapter.reduction": 4})
  spec = factory.model_spec(config)
  model = factory.build_model(spec, 5)
  # eval_shape traces init, i.e. the whole forward pass, without compiling.
  params = fixtures.param_shapes(model, IMAGE)
  labels = trees.flatten(freezing.label_params(params, factory.trainable_rules(config)))
  final_norm = r"fc_norm/.*" if flavour == "mae" else r"Transformer/encoder_norm/.*"
  patterns = [final_norm if p == "FINAL_NORM" else p for p in TRAINED[method]] + [r"head/.*"]
  for path, label in labels.items():
    expected = any(re.fullmatch(p, path) for p in patterns)
    if path == POSEMB["moco"]:
      expected = False  # fixed for every method
    assert (label == freezing.TRAIN) == expected, (path, label)


def _train(variant, method, path, num_steps):
  config = fixtures.method_config(method, variant, IMAGE, **{"model.dropout_rate": 0.0})
  spec = factory.model_spec(config)
  model = factory.build_model(spec, 5)
  params = factory.load_pretrained(fixtures.make_model_params(model, IMAGE), spec, path)
  labels = freezing.label_params(params, factory.trainable_rules(config))
  name = registry.get_method(method).optimizer
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, IMAGE, IMAGE, 3), dtype=np.uint8),
           "label": rng.integers(0, 5, (8,)).astype(np.int32)}
  initial, state, losses = train_steps(
      model, params, labels, batch, optimizer=name,
      learning_rate=0.2 if name == "sgd" else 0.01, weight_decay=1e-4,
      normalization=MEAN_STD, num_steps=num_steps)
  return flatten(initial["params"]), flatten(state["params"]), losses


@pytest.mark.parametrize("flavour, filename", [("mae", "mae.pth"), ("moco", "moco.pth.tar")])
def test_vpt_deep_learns_on_each_flavour(flavour, filename, tmp_path):
  path = tmp_path / filename
  write_official_file(flavour, path)
  before, after, losses = _train(f"{flavour}-test/{PATCH}", "vpt_deep", str(path), 4)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  for key, value in before.items():
    changed = not np.array_equal(value, after[key])
    assert changed == key.startswith(("vpt/", "head/")), key


def test_moco_position_embedding_stays_fixed_under_full_fine_tuning(tmp_path):
  path = tmp_path / "moco.pth.tar"
  state = write_official_file("moco", path)
  before, after, losses = _train(f"moco-test/{PATCH}", "full", str(path), 2)
  assert all(np.isfinite(losses))
  np.testing.assert_array_equal(after[POSEMB["moco"]], state["pos_embed"])
  changed = {key for key in before if not np.array_equal(before[key], after[key])}
  assert changed == set(before) - {POSEMB["moco"]}


def test_mae_full_fine_tuning_uses_stochastic_depth_only_when_training_the_backbone():
  params = None
  outputs = {}
  for method in ("full", "vpt_deep"):
    spec = _spec(method, f"mae-test/{PATCH}")
    model = factory.build_model(spec, 4)
    params = fixtures.make_model_params(model, IMAGE, seed=9)
    images = np.ones((4, IMAGE, IMAGE, 3), np.float32)
    outputs[method] = [_apply(model, params, images, jax.random.key(seed), train=True,
                              return_features=True) for seed in (0, 1)]
  # dropout_rate is 0 and there are no prompts with dropout in `full`: only the
  # flavour's drop path (0.1) makes two training passes differ.
  assert not np.allclose(*outputs["full"])
  np.testing.assert_array_equal(*outputs["vpt_deep"])


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
