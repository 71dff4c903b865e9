"""ConvNet backbones of the VPT paper with its pixel ("pad") prompts.

Two families for ``backbones`` (vpt.md 1.11):

* ``resnet``: torchvision's ResNet-50 (v1.5: the stride sits on the 3x3 conv
  of a bottleneck), BatchNorm always in inference mode. Its running mean and
  variance are parameters (``.../bn1/mean``, ``.../bn1/var`` next to ``scale``
  and ``bias``) behind ``jax.lax.stop_gradient`` and listed in
  ``always_frozen``, so no method, ``full`` included, ever changes them.
* ``convnext``: the official ConvNeXt (facebookresearch/ConvNeXt; VPT uses
  ConvNeXt-B pretrained on ImageNet-22k): depthwise 7x7 conv, LayerNorm (eps
  1e-6), 4x MLP with exact GELU, layer scale ``gamma``, final LayerNorm on the
  globally average-pooled map.

Parameter names mirror the PyTorch modules with "." turned into "_" where an
index follows a name: ResNet ``conv1``, ``bn1``, ``layer{s}_{i}/{conv,bn}{1,2,3}``,
``layer{s}_{i}/downsample_{conv,bn}``; ConvNeXt ``downsample_{i}/{conv,norm}``,
``stage{s}_{i}/{dwconv,norm,pwconv1,pwconv2,gamma}``, ``norm``. ``convert_torch``
maps the official state dicts onto them.

VPT for ConvNets (the reference's ``LOCATION="pad"``): the normalised image is
framed by ``p`` learned pixels on every side and the frozen network sees
(S + 2p) x (S + 2p) pixels, 234 x 234 for the paper's 224 px crops and p = 5.
The image is not resized; sizes that are not a multiple of the network's
stride lose their last rows/columns in the strided convolutions exactly as in
PyTorch (explicit symmetric padding everywhere). VPT-deep has no ConvNet
counterpart and is refused.

What trains (vpt.md 1.5, 1.11): ``partial-k`` on ResNet tunes the last k
*stages* (``layer4``, ``layer3``, ...), as the reference's partial-1/2/3; on
ConvNeXt it tunes the last k blocks and the final LayerNorm, so ``partial-1``
is the reference's ConvNeXt ``partial-0``. A stage's downsampling layer counts
with its first block. The reference's ResNet ``partial-0`` (the last
bottleneck) has no name here.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.models import backbones
from vpt_jax.models import heads as heads_lib
from vpt_jax.models import hooks as methods_lib

# The reference normalises its pad prompts (drawn in [0, 1] pixel units) with
# torchvision's ImageNet Normalize whatever the data pipeline does.
PROMPT_MEAN, PROMPT_STD = normalization_lib.IMAGENET_MEAN, normalization_lib.IMAGENET_STD
BATCH_NORM_EPSILON = 1e-5   # torchvision BatchNorm2d
LAYER_NORM_EPSILON = 1e-6   # every ConvNeXt LayerNorm
LAYER_SCALE_INIT = 1e-6     # ConvNeXt's gamma
# What the families define (backbones.Family.supported_methods).
SUPPORTED_METHODS = ("linear", "full", "partial-", "mlp-", "bias", "vpt_shallow")


# ----------------------------------------------------------------------------
# Sizes and variants.


@dataclasses.dataclass(frozen=True)
class ResNetSize:
  """Stem width, bottleneck widths per stage (outputs are 4x) and blocks per stage."""
  stem_width: int
  widths: tuple[int, ...]
  blocks: tuple[int, ...]

  @property
  def stride(self) -> int:
    """Input pixels per feature-map pixel: stem conv and max-pool, then 2 per later stage."""
    return 4 * 2 ** (len(self.widths) - 1)

  @property
  def feature_dim(self) -> int:
    return 4 * self.widths[-1]


@dataclasses.dataclass(frozen=True)
class ConvNeXtSize:
  """Channels and blocks per stage."""
  dims: tuple[int, ...]
  depths: tuple[int, ...]

  @property
  def stride(self) -> int:
    """Input pixels per feature-map pixel: the 4x4 stem, then 2 per later stage."""
    return 4 * 2 ** (len(self.dims) - 1)

  @property
  def feature_dim(self) -> int:
    return self.dims[-1]


RESNET_SIZES = {
    "50": ResNetSize(stem_width=64, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3)),
    # Tests: two stages, a projection shortcut in both first blocks.
    "test": ResNetSize(stem_width=8, widths=(4, 8), blocks=(1, 2)),
}
CONVNEXT_SIZES = {
    "B": ConvNeXtSize(dims=(128, 256, 512, 1024), depths=(3, 3, 27, 3)),
    "test": ConvNeXtSize(dims=(8, 16), depths=(1, 2)),
}
_SIZES = {"resnet": RESNET_SIZES, "convnext": CONVNEXT_SIZES}


def decode_variant(variant: str) -> tuple[str, Any]:
  """"resnet-50" -> ("resnet", ResNetSize), "convnext-B" -> ("convnext", ConvNeXtSize).

  Raises:
    ValueError: unknown variant; the message lists the valid ones.
  """
  family, _, size = variant.partition("-")
  sizes = _SIZES.get(family, {})
  if size in sizes:
    return family, sizes[size]
  valid = [f"{name}-{size}" for name, table in _SIZES.items() for size in table]
  raise ValueError(f"Unknown ConvNet variant {variant!r}; choose one of {', '.join(valid)}"
                   + backbones.did_you_mean(variant, valid, n=2))


# ----------------------------------------------------------------------------
# Modules.


class PadPrompts(nn.Module):
  """VPT's prompts for ConvNets: a frame of ``num_prompts`` (p) learned pixels.

  Parameters (pixel values, drawn U(0, 1) and normalised with ImageNet's
  mean/std at use, as the reference's ``INITIATION="random"``):
  ``top_bottom`` (2p, W + 2p, 3): rows [:p] go above the image, rows [p:]
  below; ``left_right`` (H, 2p, 3): columns [:p] go left of the image,
  columns [p:] right. (The reference's (1, 3, 2p, S + 2p) and (1, 3, S, 2p)
  tensors in NHWC.) The left/right strips span the image rows, the top/bottom
  strips the full padded width. No dropout: the reference has none.
  """
  num_prompts: int

  @nn.compact
  def __call__(self, images):
    """images: (B, H, W, 3) normalised -> (B, H + 2p, W + 2p, 3)."""
    p = self.num_prompts
    batch, height, width, channels = images.shape
    if p < 1 or channels != 3:
      raise ValueError(f"pad prompts need num_prompts >= 1 and RGB images; got "
                       f"num_prompts={p} and images of shape {images.shape}")
    uniform = nn.initializers.uniform(scale=1.0)  # U(0, 1)
    top_bottom = self.param("top_bottom", uniform, (2 * p, width + 2 * p, 3))
    left_right = self.param("left_right", uniform, (height, 2 * p, 3))
    mean, std = jnp.asarray(PROMPT_MEAN), jnp.asarray(PROMPT_STD)
    top_bottom = ((top_bottom - mean) / std).astype(images.dtype)
    left_right = ((left_right - mean) / std).astype(images.dtype)

    def batched(strip):
      return jnp.broadcast_to(strip, (batch,) + strip.shape)
    framed = jnp.concatenate(
        [batched(left_right[:, :p]), images, batched(left_right[:, p:])], axis=2)
    return jnp.concatenate(
        [batched(top_bottom[:p]), framed, batched(top_bottom[p:])], axis=1)


class FrozenBatchNorm(nn.Module):
  """BatchNorm2d in inference mode, its running statistics stored as parameters.

  ``y = (x - mean) / sqrt(var + eps) * scale + bias`` over the last axis;
  ``mean`` and ``var`` get no gradient (and ``always_frozen`` keeps the
  optimizer off them), ``scale`` and ``bias`` train like any weight.
  """
  epsilon: float = BATCH_NORM_EPSILON

  @nn.compact
  def __call__(self, x):
    """x: (..., C) -> (..., C)."""
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    mean = jax.lax.stop_gradient(self.param("mean", nn.initializers.zeros, (channels,)))
    var = jax.lax.stop_gradient(self.param("var", nn.initializers.ones, (channels,)))
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x * multiplier.astype(x.dtype) + (bias - mean * multiplier).astype(x.dtype))


# torchvision's conv init (kaiming normal, fan-out); pretrained weights replace it.
_RESNET_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5): 1x1 -> 3x3 (stride) -> 1x1 (4x width), BN after each.

  A projection shortcut (1x1 conv with the stride, then BN) replaces the
  identity when the stride or the channel count changes.
  """
  width: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), 4 * width)."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_RESNET_CONV_INIT)
    out_channels = 4 * self.width
    y = conv(self.width, (1, 1), padding="VALID", name="conv1")(x)
    y = nn.relu(FrozenBatchNorm(name="bn1")(y))
    y = conv(self.width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)),
             name="conv2")(y)
    y = nn.relu(FrozenBatchNorm(name="bn2")(y))
    y = conv(out_channels, (1, 1), padding="VALID", name="conv3")(y)
    y = FrozenBatchNorm(name="bn3")(y)
    if self.stride != 1 or x.shape[-1] != out_channels:
      x = conv(out_channels, (1, 1), strides=self.stride, padding="VALID",
               name="downsample_conv")(x)
      x = FrozenBatchNorm(name="downsample_bn")(x)
    return nn.relu(x + y)


class _ConvNet(nn.Module):
  """What ``ResNet`` and ``ConvNeXt`` share: pad prompts in front, the head after.

  Attributes:
    num_classes: classifier outputs.
    variant: a variant of the subclass's family (``decode_variant``).
    num_prompts: p of the pad prompts (0 = none).
    head_hidden_layers, head_dropout, head_init: the head (``heads.Head``).
    dtype: computation dtype of the convolutions.
  """
  num_classes: int
  variant: str
  num_prompts: int = 0
  head_hidden_layers: int = 0
  head_dropout: float = 0.1
  head_init: str = "vpt"
  dtype: Any = jnp.float32

  _FAMILY = ""  # the family of the subclass's variants

  def features(self, x, size):
    """The backbone on (padded) images in ``dtype`` -> pooled features (B, F) float32."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_features: bool = False,
               from_features: bool = False):
    """images: (B, H, W, 3) normalised floats -> logits (B, num_classes).

    ``return_features``: the pooled features the head reads (see the
    subclass). ``from_features``: ``images`` are such features; only the head
    runs. ``train`` only reaches the head.
    """
    head = heads_lib.backbone_head(self)
    if from_features:
      return head(images, train=train)
    family, size = decode_variant(self.variant)
    if family != self._FAMILY:
      raise ValueError(f"{type(self).__name__} got the {family} variant {self.variant!r}")
    x = images
    if self.num_prompts:
      x = PadPrompts(self.num_prompts, name="vpt")(x)
    features = self.features(x.astype(self.dtype), size)
    if return_features:
      return features
    return head(features, train=train)


class ResNet(_ConvNet):
  """torchvision ResNet (bottleneck variants) with optional pad prompts and the VPT head.

  Attributes as ``_ConvNet``; variant "resnet-50" or "resnet-test". The
  features are the globally pooled last stage (B, 4 * widths[-1]), 2048 for
  ResNet-50. BatchNorm always uses its running statistics, in training too.
  """
  variant: str = "resnet-50"

  _FAMILY = "resnet"

  def features(self, x, size):
    x = nn.Conv(size.stem_width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, kernel_init=_RESNET_CONV_INIT, name="conv1")(x)
    x = nn.relu(FrozenBatchNorm(name="bn1")(x))
    # PyTorch's MaxPool2d pads with -inf, as reduce_window's init value does here.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (width, blocks) in enumerate(zip(size.widths, size.blocks), start=1):
      for index in range(blocks):
        stride = 2 if stage > 1 and index == 0 else 1
        x = Bottleneck(width, stride, dtype=self.dtype, name=f"layer{stage}_{index}")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _layer_norm(name: str, dtype):
  # Two-pass variance, as PyTorch computes it.
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, use_fast_variance=False, dtype=dtype,
                      name=name)


_CONVNEXT_INIT = nn.initializers.truncated_normal(stddev=0.02)


class ConvNeXtBlock(nn.Module):
  """x + gamma * Dense(GELU(Dense(LayerNorm(DepthwiseConv7x7(x))))), widths d -> 4d -> d."""
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, dim) -> (B, H, W, dim)."""
    y = nn.Conv(self.dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=self.dim,
                dtype=self.dtype, kernel_init=_CONVNEXT_INIT, name="dwconv")(x)
    y = _layer_norm("norm", self.dtype)(y)
    y = nn.Dense(4 * self.dim, dtype=self.dtype, kernel_init=_CONVNEXT_INIT, name="pwconv1")(y)
    y = nn.gelu(y, approximate=False)  # torch.nn.GELU() is the exact erf form
    y = nn.Dense(self.dim, dtype=self.dtype, kernel_init=_CONVNEXT_INIT, name="pwconv2")(y)
    gamma = self.param("gamma", nn.initializers.constant(LAYER_SCALE_INIT), (self.dim,))
    return x + gamma.astype(y.dtype) * y


class ConvNeXtDownsample(nn.Module):
  """The stem (4x4 stride-4 conv, then LayerNorm) or a later downsampling layer
  (LayerNorm, then a 2x2 stride-2 conv); names ``conv`` and ``norm`` either way."""
  dim: int
  stem: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (B, H, W, C) -> (B, H // k, W // k, dim), k = 4 (stem) or 2."""
    patch = 4 if self.stem else 2
    conv = nn.Conv(self.dim, (patch, patch), strides=patch, padding="VALID", dtype=self.dtype,
                   kernel_init=_CONVNEXT_INIT, name="conv")
    norm = _layer_norm("norm", self.dtype)
    return norm(conv(x)) if self.stem else conv(norm(x))


class ConvNeXt(_ConvNet):
  """The official ConvNeXt with optional pad prompts and the VPT head.

  Attributes as ``_ConvNet``; variant "convnext-B" or "convnext-test". The
  features are the final LayerNorm of the globally pooled last stage
  (B, dims[-1]), 1024 for ConvNeXt-B. No stochastic depth: the reference
  builds ConvNeXt-B with drop_path_rate 0.
  """
  variant: str = "convnext-B"

  _FAMILY = "convnext"

  def features(self, x, size):
    for stage, (dim, depth) in enumerate(zip(size.dims, size.depths)):
      x = ConvNeXtDownsample(dim, stem=stage == 0, dtype=self.dtype,
                             name=f"downsample_{stage}")(x)
      for index in range(depth):
        x = ConvNeXtBlock(dim, dtype=self.dtype, name=f"stage{stage}_{index}")(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return _layer_norm("norm", jnp.float32)(pooled)


# ----------------------------------------------------------------------------
# Family functions.


def validate(spec: Mapping[str, Any], method: methods_lib.Method) -> None:
  """ConvNet checks: variant, pool, prompt settings and image size."""
  _, size = decode_variant(spec["variant"])
  if spec["pool"] != "original":
    raise ValueError(f"prompt.pool={spec['pool']!r} chooses among ViT tokens; ConvNets "
                     "average-pool their feature map: use prompt.pool=original")
  padding = 0
  if method.uses_prompts:
    if spec["prompt_projection"] >= 1:
      raise ValueError(f"prompt.projection={spec['prompt_projection']} projects token "
                       "prompts; ConvNet pad prompts are pixels: use prompt.projection=-1")
    if spec["prompt_dropout"]:
      raise ValueError(f"prompt.dropout={spec['prompt_dropout']}: the reference's pad "
                       "prompts have no dropout; use prompt.dropout=0")
    padding = 2 * spec["num_prompts"]
  fed = spec["image_size"] + padding
  if fed < size.stride:
    raise ValueError(
        f"{spec['variant']} downsamples by {size.stride}, so it needs at least "
        f"{size.stride} px; image_size {spec['image_size']} + 2 x {padding // 2} pad "
        f"prompts gives {fed}; use model.image_size >= {size.stride - padding} "
        "(the reference: 224)")


def build(spec: Mapping[str, Any], num_classes: int, method: methods_lib.Method):
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
  """A torchvision ResNet state dict -> {model key: array} for ``npz.merge_backbone``.

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
