"""The Swin family: the official checkpoint layout, the specs and methods it supports
(each trained for a few steps) and Swin-B's parameter counts."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_swin as ref
from method_fixtures import assert_only_trainable_changed
from method_fixtures import train_steps
from vpt_jax.checkpoints import merge
from vpt_jax.checkpoints import npz
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.methods import base
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.models import swin
from vpt_jax.models import swin_family
from vpt_jax.params import freezing
from vpt_jax.params import trees


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


@pytest.mark.parametrize("variant", sorted(ref.TINY))
def test_conversion_puts_every_tensor_in_place(variant):
  sd = ref.official_state_dict(variant)
  converted = swin_family.convert_torch(sd, variant)
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
  prefixed = swin_family.convert_torch({f"model.{k}": v for k, v in sd.items()}, variant)
  for key, value in converted.items():
    np.testing.assert_array_equal(prefixed[key], value)


def test_conversion_reports_unknown_missing_and_misshaped_keys():
  variant = "swin-test/4w2"
  sd = ref.official_state_dict(variant)
  sd["absolute_pos_embed"] = np.zeros((1, 64, 16), np.float32)
  del sd["layers.1.blocks.1.mlp.fc2.bias"]
  sd["layers.0.downsample.reduction.weight"] = np.zeros((32, 32), np.float32)
  with pytest.raises(npz.CheckpointError) as error:
    swin_family.convert_torch(sd, variant)
  message = str(error.value)
  assert "absolute_pos_embed" in message and "unknown" in message
  assert "layers.1.blocks.1.mlp.fc2.bias" in message and "missing" in message
  assert "layers.0.downsample.reduction.weight: file (32, 32)" in message
  with pytest.raises(npz.CheckpointError, match="layers.2.blocks"):
    swin_family.convert_torch(ref.official_state_dict("swin-test3/4w2"), variant)


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
  torch_bias = {key for key in swin_family.torch_layout("swin-test/4w2") if "bias" in key}
  ours = {swin_family.torch_layout("swin-test/4w2")[key][0].split(":")[0] for key in torch_bias}
  assert {k for k, v in labels.items() if v == freezing.TRAIN and not k.startswith("head/")} == ours
  assert "layers_1/blocks_0/attn/relative_position/bias" in ours


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
  params = merge.merge_backbone(trees.unflatten(flat), backbone, fresh=method.fresh_patterns)
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
  backbone = swin_family.convert_torch(ref.official_state_dict("swin-test/4w2", seed=5),
                                       "swin-test/4w2")
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
