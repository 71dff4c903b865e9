"""The ResNet and ConvNeXt families with VPT's pad prompts (vpt.md 1.11).

The Flax models are checked against NumPy forwards that read the official
PyTorch state dicts directly (tests/numpy_convnets.py), the conversion against
hand-placed elements, every supported method by a few real training steps, and
the full-size models by closed-form parameter counts.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
import checkpoint_fixtures as fixtures
import numpy_convnets as ref
import torch_fixtures
from convnet_fixtures import CLASSES
from convnet_fixtures import converted_variables
from convnet_fixtures import forward
from convnet_fixtures import images_of
from convnet_fixtures import model_for
from convnet_fixtures import numpy_features
from convnet_fixtures import random_variables
from convnet_fixtures import torch_state
from method_fixtures import assert_only_trainable_changed
from method_fixtures import train_steps
from vpt_jax.checkpoints import merge
from vpt_jax.checkpoints import npz
from vpt_jax.methods import registry
from vpt_jax.models import convnet_base
from vpt_jax.models import convnet_family
from vpt_jax.methods import factory
from vpt_jax.params import freezing
from vpt_jax.params import trees


# ----------------------------------------------------------------------------
# Forward against NumPy on converted official state dicts.


@pytest.mark.numerics
# Sizes that are not multiples of the stride (8) exercise PyTorch's floor rule.
@pytest.mark.parametrize("variant", ["resnet-test", "convnext-test"])
@pytest.mark.parametrize("image_size, p", [(20, 0), (19, 2)])
def test_forward_matches_numpy_on_the_official_state_dict(variant, image_size, p):
  state = torch_state(variant)
  prompts = ref.torch_pad_prompts(image_size, p) if p else None
  model, variables = converted_variables(variant, state, image_size, prompts, p)
  images = images_of(image_size)
  expected = numpy_features(variant, state, images, prompts, p)
  features, logits = forward(model)(variables, images)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, expected @ head["kernel"] + head["bias"],
                             rtol=1e-4, atol=1e-4)
  # The head alone, as head-only methods run it on cached features.
  # One Dense layer in another program: a sum as long as the feature width.
  atol = tolerances.rounding_atol(np.max(np.abs(logits)), reduction_length=features.shape[-1])
  np.testing.assert_allclose(model.apply(variables, features, from_features=True), logits,
                             rtol=0, atol=atol)


# ----------------------------------------------------------------------------
# Conversion.


@pytest.mark.parametrize("variant", ["resnet-test", "convnext-test"])
def test_conversion_covers_exactly_the_backbone(variant):
  state = torch_state(variant)
  converted = convnet_family.FAMILIES[variant.split("-")[0]].convert_torch(state, variant)
  shapes = trees.flatten(jax.eval_shape(
      model_for(variant, 2).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
  backbone = {k: v.shape for k, v in shapes.items() if not k.startswith(("head/", "vpt/"))}
  assert {k: v.shape for k, v in converted.items()} == backbone
  # The classifier and BatchNorm's counters are dropped; nothing else.
  dropped = [k for k in state if k.endswith("num_batches_tracked") or k.startswith(("fc.", "head."))]
  assert len(converted) == len(state) - len(dropped)


def test_resnet_tensors_land_in_place():
  state = torch_state("resnet-test")
  converted = convnet_family.convert_resnet(state, "resnet-test")
  # Conv (O, I, kh, kw) -> (kh, kw, I, O): checked elementwise, not by transpose.
  weight = state["layer2.0.conv2.weight"]          # (8, 8, 3, 3)
  kernel = converted["layer2_0/conv2/kernel"]
  for o, i, y, x in [(0, 1, 2, 0), (7, 3, 0, 2), (5, 5, 1, 1)]:
    assert kernel[y, x, i, o] == weight[o, i, y, x]
  assert converted["conv1/kernel"][6, 0, 2, 7] == state["conv1.weight"][7, 2, 6, 0]
  assert (converted["layer2_0/downsample_conv/kernel"][0, 0, 15, 31]
          == state["layer2.0.downsample.0.weight"][31, 15, 0, 0])
  np.testing.assert_array_equal(converted["layer1_0/bn3/scale"], state["layer1.0.bn3.weight"])
  np.testing.assert_array_equal(converted["layer1_0/bn3/bias"], state["layer1.0.bn3.bias"])
  np.testing.assert_array_equal(converted["layer2_1/bn2/mean"], state["layer2.1.bn2.running_mean"])
  np.testing.assert_array_equal(converted["layer2_1/bn2/var"], state["layer2.1.bn2.running_var"])
  np.testing.assert_array_equal(converted["layer2_0/downsample_bn/var"],
                                state["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(converted["bn1/mean"], state["bn1.running_mean"])


def test_convnext_tensors_land_in_place():
  state = torch_state("convnext-test")
  converted = convnet_family.convert_convnext(state, "convnext-test")
  dw = state["stages.1.1.dwconv.weight"]          # (16, 1, 7, 7)
  assert converted["stage1_1/dwconv/kernel"].shape == (7, 7, 1, 16)
  for c, y, x in [(0, 0, 6), (15, 3, 1), (9, 6, 6)]:
    assert converted["stage1_1/dwconv/kernel"][y, x, 0, c] == dw[c, 0, y, x]
  pw1 = state["stages.0.0.pwconv1.weight"]        # Linear (32, 8)
  assert converted["stage0_0/pwconv1/kernel"][3, 30] == pw1[30, 3]
  pw2 = state["stages.1.0.pwconv2.weight"]        # Linear (16, 64)
  assert converted["stage1_0/pwconv2/kernel"][63, 2] == pw2[2, 63]
  # The stem is (conv, LN); later downsampling layers are (LN, conv).
  assert converted["downsample_0/conv/kernel"][3, 1, 2, 7] == state[
      "downsample_layers.0.0.weight"][7, 2, 3, 1]
  np.testing.assert_array_equal(converted["downsample_0/norm/scale"],
                                state["downsample_layers.0.1.weight"])
  np.testing.assert_array_equal(converted["downsample_1/norm/bias"],
                                state["downsample_layers.1.0.bias"])
  assert converted["downsample_1/conv/kernel"][1, 0, 7, 15] == state[
      "downsample_layers.1.1.weight"][15, 7, 1, 0]
  np.testing.assert_array_equal(converted["downsample_1/conv/bias"],
                                state["downsample_layers.1.1.bias"])
  np.testing.assert_array_equal(converted["stage1_1/gamma"], state["stages.1.1.gamma"])
  np.testing.assert_array_equal(converted["stage1_1/norm/scale"], state["stages.1.1.norm.weight"])
  np.testing.assert_array_equal(converted["norm/scale"], state["norm.weight"])
  np.testing.assert_array_equal(converted["norm/bias"], state["norm.bias"])


@pytest.mark.parametrize("variant, drop, add, message", [
    ("resnet-test", "layer2.1.bn2.running_var", None, "missing: layer2.1.bn2.running_var"),
    ("resnet-test", None, "layer3.0.conv1.weight", "unexpected: layer3.0.conv1.weight"),
    ("convnext-test", "stages.1.1.gamma", None, "missing: stages.1.1.gamma"),
    ("convnext-test", None, "stages.0.0.attn.weight", "unexpected: stages.0.0.attn.weight"),
])
def test_conversion_refuses_missing_and_unknown_keys(variant, drop, add, message):
  state = torch_state(variant)
  if drop:
    del state[drop]
  if add:
    state[add] = np.zeros((1,), np.float32)
  family = convnet_family.FAMILIES[variant.split("-")[0]]
  with pytest.raises(npz.CheckpointError, match=re.escape(message)):
    family.convert_torch(state, variant)


def test_conversion_names_a_wrapper_prefix_and_a_wrong_rank():
  state = {f"module.{k}": v for k, v in torch_state("resnet-test").items()}
  with pytest.raises(npz.CheckpointError, match="strip the wrapper prefix 'module.'"):
    convnet_family.convert_resnet(state, "resnet-test")
  state = torch_state("convnext-test")
  state["stages.0.0.pwconv1.weight"] = state["stages.0.0.pwconv1.weight"][None]
  with pytest.raises(npz.CheckpointError, match="stages.0.0.pwconv1.weight has shape"):
    convnet_family.convert_convnext(state, "convnext-test")
  # The smaller variant's file for the bigger model: every extra block is missing.
  with pytest.raises(npz.CheckpointError, match="is it a resnet-50 checkpoint"):
    convnet_family.convert_resnet(torch_state("resnet-test"), "resnet-50")


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_factory_loads_the_official_pth_layout(family, tmp_path):
  """A real torch zip file: torchvision saves a bare state dict, ConvNeXt {"model": ...}."""
  variant = VARIANTS[family]
  state = torch_state(variant)
  tensors = {k: torch_fixtures.tensor_of(v, str(i)) for i, (k, v) in enumerate(state.items())}
  path = str(tmp_path / f"{family}.pth")
  torch_fixtures.write_torch_zip(tensors if family == "resnet" else {"model": tensors}, path)
  config = method_config(family, "linear", **{"model.image_size": 20})
  spec = factory.model_spec(config)
  model = factory.build_model(spec, CLASSES)
  loaded = factory.load_pretrained(random_variables(model, 20)["params"], spec, path)
  features, _ = forward(model)({"params": loaded}, images_of(20))
  np.testing.assert_allclose(features, numpy_features(variant, state, images_of(20)),
                             rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Training every supported method.

IMAGE, PROMPTS, STEPS = 16, 2, 4
LEARNING_RATES = {"sgd": 0.02, "adamw": 0.01}
VARIANTS = {"resnet": "resnet-test", "convnext": "convnext-test"}
STATISTICS = r".*/(mean|var)"
# Head-only methods train on cached features, as the trainer runs them
# (config.cache_features); the others on images.
HEAD_ONLY = ("linear", "mlp-3")
# partial-2's set is checked on the labels only (partial-1 trains: same
# mechanism, a shorter backward pass to compile).
LABELS_ONLY = ("partial-2",)
# What each method trains besides the head, written from vpt.md 1.5 / 1.11:
# ResNet's partial-k tunes whole stages (resnet-test: layer1, layer2; the stem
# never); ConvNeXt's the last k blocks plus the final norm, a stage's
# downsampling layer with its first block. BatchNorm statistics never train.
EXPECTED = {
    ("resnet", "linear"): r"head/.*",
    ("resnet", "full"): r".*",
    ("resnet", "partial-1"): r"head/.*|layer2_\d+/.*",
    ("resnet", "partial-2"): r"head/.*|layer[12]_\d+/.*",
    ("resnet", "mlp-3"): r"head/.*",
    ("resnet", "bias"): r"head/.*|.*/bias",
    ("resnet", "vpt_shallow"): r"head/.*|vpt/.*",
    ("convnext", "linear"): r"head/.*",
    ("convnext", "full"): r".*",
    ("convnext", "partial-1"): r"head/.*|stage1_1/.*|norm/.*",
    ("convnext", "partial-2"): r"head/.*|stage1_[01]/.*|downsample_1/.*|norm/.*",
    ("convnext", "mlp-3"): r"head/.*",
    ("convnext", "bias"): r"head/.*|.*/bias",
    ("convnext", "vpt_shallow"): r"head/.*|vpt/.*",
}


def expected_trainable(family: str, method: str, path: str) -> bool:
  if re.fullmatch(STATISTICS, path):
    return False
  return re.fullmatch(EXPECTED[(family, method)], path) is not None


def method_config(family: str, method: str, **overrides):
  return fixtures.method_config(method, VARIANTS[family], IMAGE, num_prompts=PROMPTS,
                                **overrides)


_RUNS = {}


def trained(family: str, method: str) -> dict:
  """Builds, loads the converted tiny backbone, trains STEPS steps on one batch (cached)."""
  if (family, method) in _RUNS:
    return _RUNS[(family, method)]
  config = method_config(family, method)
  method_spec = registry.get_method(config.method)
  spec = factory.model_spec(config)
  model = factory.build_model(spec, CLASSES)
  variables = random_variables(model, IMAGE)
  variant = VARIANTS[family]
  backbone = convnet_family.FAMILIES[family].convert_torch(torch_state(variant), variant)
  params = merge.merge_backbone(variables["params"], backbone,
                                fresh=method_spec.fresh_patterns, source="test")
  labels = freezing.label_params(params, factory.trainable_rules(config))
  if method in LABELS_ONLY:
    _RUNS[(family, method)] = dict(labels=labels, initial={"params": params})
    return _RUNS[(family, method)]
  rng = np.random.default_rng(0)
  batch = {"label": rng.integers(0, CLASSES, (8,)).astype(np.int32)}
  if method in HEAD_ONLY:
    batch["features"] = rng.normal(0, 1, (8, convnet_base.decode_variant(variant)[1].feature_dim))
  else:
    batch["image"] = rng.integers(0, 256, (8, IMAGE, IMAGE, 3), dtype=np.uint8)
  optimizer = method_spec.optimizer
  initial, state, losses = train_steps(
      model, params, labels, batch, optimizer=optimizer,
      learning_rate=LEARNING_RATES[optimizer], weight_decay=config.optim.weight_decay,
      normalization=dict(mean=convnet_base.PROMPT_MEAN, std=convnet_base.PROMPT_STD),
      num_steps=STEPS, batch_stats=variables.get("batch_stats"))
  _RUNS[(family, method)] = dict(labels=labels, initial=initial, state=state, losses=losses)
  return _RUNS[(family, method)]


@pytest.mark.parametrize("family, method", list(EXPECTED))
def test_every_supported_method_trains_only_its_parameters(family, method):
  run = trained(family, method)
  before = trees.flatten(run["initial"]["params"])
  labels = trees.flatten(run["labels"])
  for path in before:
    assert (labels[path] == freezing.TRAIN) == expected_trainable(family, method, path), path
  if method in LABELS_ONLY:
    return
  assert all(np.isfinite(run["losses"])) and run["losses"][-1] < run["losses"][0], run["losses"]
  after = trees.flatten(run["state"]["params"])
  assert_only_trainable_changed(before, after,
                                lambda path: expected_trainable(family, method, path))
  statistics = [p for p in before if re.fullmatch(STATISTICS, p)]
  assert len(statistics) == (0 if family == "convnext" else 2 * 12)  # 12 BatchNorms
  for path in statistics:
    np.testing.assert_array_equal(before[path], after[path], err_msg=path)


@pytest.mark.parametrize("method", ["vpt_deep", "vpt+bias", "adapter", "lora", "cvpt",
                                    "sidetune", "vfpt", "e2vpt"])
@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_methods_without_a_convnet_definition_are_refused(family, method):
  spec = factory.model_spec(method_config(family, method))
  with pytest.raises(ValueError, match=f"method '{re.escape(method)}' is not defined for "
                                       f"{family} backbones; choose one of linear, full"):
    factory.validate_spec(spec)


@pytest.mark.parametrize("family, method, overrides, message", [
    ("resnet", "vpt_shallow", {"prompt.pool": "prompt_pool"}, "use prompt.pool=original"),
    ("convnext", "vpt_shallow", {"prompt.dropout": 0.1}, "use prompt.dropout=0"),
    ("convnext", "vpt_shallow", {"prompt.projection": 8}, "use prompt.projection=-1"),
    # convnext-test downsamples by 8: 2 + 2 x 2 = 6 px leave no feature map.
    ("convnext", "vpt_shallow", {"model.image_size": 2}, "use model.image_size >= 4"),
    ("resnet", "linear", {"model.image_size": 7}, "use model.image_size >= 8"),
    ("resnet", "partial-3", {}, "use partial-k with k <= 2"),
    ("convnext", "partial-4", {}, "use partial-k with k <= 3"),
    ("resnet", "linear", {"model.variant": "resnet-51"}, "choose one of resnet-50, resnet-test"),
    ("convnext", "linear", {"model.variant": "convnext-b"}, "did you mean convnext-B"),
])
def test_bad_settings_are_refused_before_compute(family, method, overrides, message):
  spec = factory.model_spec(method_config(family, method, **overrides))
  with pytest.raises(ValueError, match=re.escape(message)):
    factory.validate_spec(spec)


# The last feature map of a 234 px input, by hand. ResNet-50: the 7x7 stride-2 stem
# (pad 3) 234 -> 117, the 3x3 stride-2 max-pool (pad 1) -> 59, three stride-2 3x3
# convs (pad 1) -> 30 -> 15 -> 8. ConvNeXt-B: the 4x4 stride-4 stem -> 58, three 2x2
# stride-2 downsamplings -> 29 -> 14 -> 7.
@pytest.mark.parametrize("family, variant, last_stage, side, channels", [
    ("resnet", "resnet-50", "layer4_2", 8, 2048), ("convnext", "convnext-B", "stage3_2", 7, 1024)])
def test_the_reference_sizes_are_accepted_without_resizing(family, variant, last_stage, side,
                                                           channels):
  # 224 px crops + 2 x 5 prompt pixels = 234, not a multiple of 32: the reference's input.
  spec = factory.model_spec(method_config(
      family, "vpt_shallow", **{"model.variant": variant, "model.image_size": 224,
                                "prompt.num_prompts": 5}))
  factory.validate_spec(spec)
  model = factory.build_model(spec, 7)
  images = jnp.zeros((1, 224, 224, 3))

  def forward_shapes():
    variables = model.init(jax.random.key(0), images)
    return model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])

  logits, state = jax.eval_shape(forward_shapes)  # shapes only: full size costs nothing
  seen = state["intermediates"]
  assert seen["vpt"]["__call__"][0].shape == (1, 234, 234, 3)  # padded, not resized
  assert seen[last_stage]["__call__"][0].shape == (1, side, side, channels)
  assert logits.shape == (1, 7)


# ----------------------------------------------------------------------------
# Full-size parameter counts (shapes only).

# torchvision's published totals (1000-class fc / head included).
RESNET50_TORCHVISION = 25_557_032
CONVNEXT_B_TORCHVISION = 88_591_464


def resnet50_backbone() -> tuple[int, int]:
  """(weights incl. BatchNorm scale/bias, BatchNorm channels) of ResNet-50 without fc."""
  weights, channels = 3 * 64 * 49, 64
  inplanes = 64
  for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
    for index in range(blocks):
      weights += inplanes * width + width * width * 9 + width * 4 * width
      channels += width + width + 4 * width
      if index == 0:  # every first block projects (64 -> 256 or a stride)
        weights += inplanes * 4 * width
        channels += 4 * width
      inplanes = 4 * width
  return weights + 2 * channels, channels


def convnext_b_backbone() -> int:
  """ConvNeXt-B without head: stem, 3 downsamplings, blocks (8 d^2 + 58 d), final norm."""
  dims, depths = (128, 256, 512, 1024), (3, 3, 27, 3)
  total = 3 * 16 * dims[0] + dims[0] + 2 * dims[0] + 2 * dims[-1]
  for previous, dim in zip(dims, dims[1:]):
    total += 2 * previous + 4 * previous * dim + dim
  # dwconv 49 d + d, norm 2 d, pwconv1 4 d^2 + 4 d, pwconv2 4 d^2 + d, gamma d.
  return total + sum(depth * (8 * dim * dim + 58 * dim) for dim, depth in zip(dims, depths))


def pad_prompt_count(image_size: int, p: int) -> int:
  return 3 * 2 * p * (image_size + 2 * p) + 3 * image_size * 2 * p


@pytest.mark.parametrize("family, variant, feature_dim", [
    ("resnet", "resnet-50", 2048), ("convnext", "convnext-B", 1024)])
@pytest.mark.parametrize("method", ["vpt_shallow", "full"])
def test_full_size_trainable_counts_are_closed_form(family, variant, feature_dim, method):
  classes, p = 100, 5
  config = method_config(family, method, **{"model.variant": variant,
                                            "model.image_size": 224, "prompt.num_prompts": p})
  model = factory.build_model(factory.model_spec(config), classes)
  params = factory.variable_shapes(model, 224)["params"]
  labels = freezing.label_params(params, factory.trainable_rules(config))
  trainable, frozen = freezing.split(params, labels)
  assert params["head"]["kernel"].shape == (feature_dim, classes)  # the pooled feature width
  head = feature_dim * classes + classes
  if family == "resnet":
    backbone, channels = resnet50_backbone()
    assert backbone == RESNET50_TORCHVISION - (2048 * 1000 + 1000)
    statistics = 2 * channels   # running mean and var, stored as frozen parameters
  else:
    backbone, statistics = convnext_b_backbone(), 0
    assert backbone == CONVNEXT_B_TORCHVISION - (1024 * 1000 + 1000)
  prompts = pad_prompt_count(224, p) if method == "vpt_shallow" else 0
  assert prompts == (13_740 if method == "vpt_shallow" else 0)
  expected = {"vpt_shallow": prompts + head, "full": backbone + head}[method]
  assert freezing.count(trainable) == expected
  assert freezing.count(trainable) + freezing.count(frozen) == (
      backbone + statistics + head + prompts)
