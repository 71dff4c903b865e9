"""The ConvNet families for ``backbones`` (vpt.md 1.11): ``resnet`` and ``convnext``.

Validates and builds ``resnet.ResNet`` / ``convnext.ConvNeXt`` from a model
spec, names their blocks for partial-k, and maps the official state dicts
(torchvision ResNet, facebookresearch/ConvNeXt) onto the models' parameter
names (``convert_torch``).

What trains (vpt.md 1.5, 1.11): ``partial-k`` on ResNet tunes the last k
*stages* (``layer4``, ``layer3``, ...), as the reference's partial-1/2/3; on
ConvNeXt it tunes the last k blocks and the final LayerNorm, so ``partial-1``
is the reference's ConvNeXt ``partial-0``. A stage's downsampling layer counts
with its first block. The reference's ResNet ``partial-0`` (the last
bottleneck) has no name here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from vpt_jax import errors
from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.models import backbones
from vpt_jax.models import hooks
from vpt_jax.models.convnet_base import ConvNeXtSize
from vpt_jax.models.convnet_base import ResNetSize
from vpt_jax.models.convnet_base import decode_variant
from vpt_jax.models.convnext import ConvNeXt
from vpt_jax.models.resnet import ResNet

# What the families define (backbones.Family.supported_methods).
SUPPORTED_METHODS = ("linear", "full", "partial-", "mlp-", "bias", "vpt_shallow")


def validate(spec: Mapping[str, Any], method: hooks.Method) -> None:
  """ConvNet checks: variant, pool, prompt settings and image size."""
  _, size = decode_variant(spec["variant"])
  if spec["pool"] != "original":
    raise errors.UserError(f"prompt.pool={spec['pool']!r} chooses among ViT tokens; ConvNets "
                           "average-pool their feature map: use prompt.pool=original")
  padding = 0
  if method.uses_prompts:
    if spec["prompt_projection"] >= 1:
      raise errors.UserError(f"prompt.projection={spec['prompt_projection']} projects token "
                             "prompts; ConvNet pad prompts are pixels: use prompt.projection=-1")
    if spec["prompt_dropout"]:
      raise errors.UserError(f"prompt.dropout={spec['prompt_dropout']}: the reference's pad "
                             "prompts have no dropout; use prompt.dropout=0")
    padding = 2 * spec["num_prompts"]
  fed = spec["image_size"] + padding
  if fed < size.stride:
    raise errors.UserError(
        f"{spec['variant']} downsamples by {size.stride}, so it needs at least "
        f"{size.stride} px; image_size {spec['image_size']} + 2 x {padding // 2} pad "
        f"prompts gives {fed}; use model.image_size >= {size.stride - padding} "
        "(the reference: 224)")


def build(spec: Mapping[str, Any], num_classes: int, method: hooks.Method):
  """The ``ResNet`` or ``ConvNeXt`` of a (validated) spec."""
  family, _ = decode_variant(spec["variant"])
  module = ResNet if family == "resnet" else ConvNeXt
  return module(
      num_classes=num_classes,
      variant=spec["variant"],
      num_prompts=spec["num_prompts"] if method.uses_prompts else 0,
      dtype=backbones.DTYPES[spec["dtype"]],
      **backbones.head_settings(spec, method))


def resnet_stage_patterns(variant: str) -> list[str]:
  """``layer{s}_\\d+`` per stage: ResNet's partial-k tunes whole stages (vpt.md 1.11)."""
  _, size = decode_variant(variant)
  return [rf"layer{stage}_\d+" for stage in range(1, len(size.widths) + 1)]


def convnext_block_patterns(variant: str) -> list[str]:
  """``stage{s}_{i}`` per block; a stage's first block also owns ``downsample_{s}``."""
  _, size = decode_variant(variant)
  patterns = []
  for stage, depth in enumerate(size.depths):
    patterns.append(rf"(?:downsample_{stage}|stage{stage}_0)")
    patterns.extend(f"stage{stage}_{index}" for index in range(1, depth))
  return patterns


# ----------------------------------------------------------------------------
# PyTorch state dicts.

# How a PyTorch tensor becomes a Flax array.
_CONV, _LINEAR, _VECTOR = "conv", "linear", "vector"
_TORCH_BATCH_NORM = {"weight": "scale", "bias": "bias", "running_mean": "mean",
                     "running_var": "var"}


def _batch_norm_keys(torch_prefix: str, model_prefix: str) -> dict[str, tuple[str, str]]:
  return {f"{torch_prefix}.{name}": (f"{model_prefix}/{ours}", _VECTOR)
          for name, ours in _TORCH_BATCH_NORM.items()}


def resnet_torch_keys(size: ResNetSize) -> dict[str, tuple[str, str]]:
  """torchvision key -> (model key, kind) for every tensor the backbone needs."""
  keys = {"conv1.weight": ("conv1/kernel", _CONV), **_batch_norm_keys("bn1", "bn1")}
  in_channels = size.stem_width
  for stage, (width, blocks) in enumerate(zip(size.widths, size.blocks), start=1):
    for index in range(blocks):
      torch_block, block = f"layer{stage}.{index}", f"layer{stage}_{index}"
      for conv in (1, 2, 3):
        keys[f"{torch_block}.conv{conv}.weight"] = (f"{block}/conv{conv}/kernel", _CONV)
        keys.update(_batch_norm_keys(f"{torch_block}.bn{conv}", f"{block}/bn{conv}"))
      stride = 2 if stage > 1 and index == 0 else 1
      if stride != 1 or in_channels != 4 * width:  # as Bottleneck's projection shortcut
        keys[f"{torch_block}.downsample.0.weight"] = (f"{block}/downsample_conv/kernel", _CONV)
        keys.update(_batch_norm_keys(f"{torch_block}.downsample.1", f"{block}/downsample_bn"))
      in_channels = 4 * width
  return keys


def convnext_torch_keys(size: ConvNeXtSize) -> dict[str, tuple[str, str]]:
  """facebookresearch/ConvNeXt key -> (model key, kind) for every backbone tensor."""
  keys = {}
  for stage, depth in enumerate(size.depths):
    torch_down, down = f"downsample_layers.{stage}", f"downsample_{stage}"
    # Sequential index: the stem is (conv, norm), later layers (norm, conv).
    conv_index, norm_index = (0, 1) if stage == 0 else (1, 0)
    keys[f"{torch_down}.{conv_index}.weight"] = (f"{down}/conv/kernel", _CONV)
    keys[f"{torch_down}.{conv_index}.bias"] = (f"{down}/conv/bias", _VECTOR)
    keys[f"{torch_down}.{norm_index}.weight"] = (f"{down}/norm/scale", _VECTOR)
    keys[f"{torch_down}.{norm_index}.bias"] = (f"{down}/norm/bias", _VECTOR)
    for index in range(depth):
      torch_block, block = f"stages.{stage}.{index}", f"stage{stage}_{index}"
      keys[f"{torch_block}.dwconv.weight"] = (f"{block}/dwconv/kernel", _CONV)
      keys[f"{torch_block}.dwconv.bias"] = (f"{block}/dwconv/bias", _VECTOR)
      keys[f"{torch_block}.norm.weight"] = (f"{block}/norm/scale", _VECTOR)
      keys[f"{torch_block}.norm.bias"] = (f"{block}/norm/bias", _VECTOR)
      for linear in ("pwconv1", "pwconv2"):
        keys[f"{torch_block}.{linear}.weight"] = (f"{block}/{linear}/kernel", _LINEAR)
        keys[f"{torch_block}.{linear}.bias"] = (f"{block}/{linear}/bias", _VECTOR)
      keys[f"{torch_block}.gamma"] = (f"{block}/gamma", _VECTOR)
  keys["norm.weight"] = ("norm/scale", _VECTOR)
  keys["norm.bias"] = ("norm/bias", _VECTOR)
  return keys


# Tensors that are no backbone weight: the classifier (a new task gets a new
# head) and BatchNorm's update counter.
_RESNET_IGNORED = re.compile(r"fc\.(weight|bias)|.*\.num_batches_tracked")
_CONVNEXT_IGNORED = re.compile(r"head\.(weight|bias)")
_RANKS = {_CONV: 4, _LINEAR: 2, _VECTOR: 1}


def _listing(keys: Sequence[str], limit: int = 12) -> str:
  keys = sorted(keys)
  return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _convert(state_dict: Mapping[str, Any], variant: str, expected: dict,
             ignored: re.Pattern, source: str) -> dict[str, np.ndarray]:
  """Renames and transposes ``state_dict`` per ``expected``; strict both ways."""
  unknown = [k for k in state_dict if k not in expected and not ignored.fullmatch(k)]
  missing = [k for k in expected if k not in state_dict]
  if unknown or missing:
    message = [f"the state dict does not match {variant} ({source} key names)"]
    if missing:
      message.append(f"missing: {_listing(missing)}")
    if unknown:
      message.append(f"unexpected: {_listing(unknown)}")
    # A wrapper (DataParallel's "module.", a "model." dict) shows up as one
    # unknown top-level name in front of every unexpected key.
    roots = {k.split(".", 1)[0] for k in unknown} - {k.split(".", 1)[0] for k in expected}
    if len(roots) == 1 and all(k.startswith(f"{min(roots)}.") for k in unknown):
      message.append(f"strip the wrapper prefix '{min(roots)}.' from the keys")
    else:
      message.append(f"is it a {variant} checkpoint?")
    raise npz_lib.CheckpointError("; ".join(message))
  converted = {}
  for torch_key, (model_key, kind) in expected.items():
    value = np.asarray(state_dict[torch_key])
    if value.ndim != _RANKS[kind]:
      raise npz_lib.CheckpointError(
          f"{torch_key} has shape {value.shape}; a {kind} tensor of {source} has "
          f"{_RANKS[kind]} dimensions")
    if kind == _CONV:     # PyTorch (O, I/groups, H, W) -> Flax (H, W, I/groups, O)
      value = value.transpose(2, 3, 1, 0)
    elif kind == _LINEAR:  # PyTorch (out, in) -> Flax (in, out)
      value = value.T
    converted[model_key] = np.ascontiguousarray(value)
  return converted


def convert_resnet(state_dict: Mapping[str, Any], variant: str) -> dict[str, np.ndarray]:
  """A torchvision ResNet state dict -> {model key: array} for ``merge.merge_backbone``.

  Convolutions (O, I, kh, kw) become (kh, kw, I, O); BatchNorm ``weight``,
  ``bias``, ``running_mean``, ``running_var`` become ``scale``, ``bias``,
  ``mean``, ``var``; ``fc.*`` and ``num_batches_tracked`` are dropped.

  Raises:
    npz.CheckpointError: missing or unexpected keys (all listed) or a tensor
      of the wrong rank.
  """
  family, size = decode_variant(variant)
  if family != "resnet":
    raise ValueError(f"convert_resnet got the {family} variant {variant!r}")
  return _convert(state_dict, variant, resnet_torch_keys(size), _RESNET_IGNORED,
                  "torchvision resnet")


def convert_convnext(state_dict: Mapping[str, Any], variant: str) -> dict[str, np.ndarray]:
  """An official ConvNeXt state dict (the checkpoint's "model" entry) -> {model key: array}.

  Convolutions, the depthwise one included ((C, 1, 7, 7) -> (7, 7, 1, C)),
  become (kh, kw, I, O); ``pwconv1``/``pwconv2`` Linear weights are
  transposed; LayerNorm ``weight`` becomes ``scale``; ``head.*`` is dropped.

  Raises:
    npz.CheckpointError: missing or unexpected keys (all listed) or a tensor
      of the wrong rank.
  """
  family, size = decode_variant(variant)
  if family != "convnext":
    raise ValueError(f"convert_convnext got the {family} variant {variant!r}")
  return _convert(state_dict, variant, convnext_torch_keys(size), _CONVNEXT_IGNORED,
                  "facebookresearch/ConvNeXt")


FAMILIES = {
    "resnet": backbones.Family(
        name="resnet", build=build, validate=validate,
        block_patterns=resnet_stage_patterns,
        final_norm=r"(?!)",  # matches nothing: no norm follows ResNet's last stage
        always_frozen=(r"(.*/)?(bn\d+|downsample_bn)/(mean|var)",),
        convert_torch=convert_resnet, supported_methods=SUPPORTED_METHODS),
    "convnext": backbones.Family(
        name="convnext", build=build, validate=validate,
        block_patterns=convnext_block_patterns, final_norm=r"norm/.*",
        convert_torch=convert_convnext, supported_methods=SUPPORTED_METHODS),
}
