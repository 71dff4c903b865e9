"""Reference ResNet / ConvNeXt forwards in NumPy float64, on PyTorch state dicts.

The yardstick for ``vpt_jax.models.resnet`` and ``vpt_jax.models.convnext``. It
works in PyTorch's own layout (NCHW activations, (O, I/groups, kh, kw) conv
weights, (out, in) Linear weights, the official key names), so it shares
nothing with the Flax model, not even the key conversion:

* torchvision ResNet (v1.5): conv1 7x7/2 pad 3, BatchNorm (eval: running
  statistics, eps 1e-5), ReLU, max-pool 3x3/2 pad 1; bottlenecks 1x1 -> 3x3
  (stride, pad 1) -> 1x1, each followed by BatchNorm, ReLU after the first two
  and after the residual sum; ``downsample.0/1`` (1x1 conv with the stride, BN)
  on the shortcut when present; global average pool.
* facebookresearch/ConvNeXt: ``downsample_layers[0]`` = conv 4x4/4 then
  channels-first LayerNorm, later ones LayerNorm then conv 2x2/2; blocks
  x + gamma * pwconv2(GELU(pwconv1(LN(dwconv7x7(x))))) (exact erf GELU, LN
  eps 1e-6); final LayerNorm of the global average.
* VPT pad prompts (KMnP/vpt ``ResNet.incorporate_prompt``): prompt tensors
  tb (1, 3, 2p, S + 2p) and lr (1, 3, S, 2p) normalised with ImageNet
  mean/std, x = cat(lr[..., :p], x, lr[..., p:]) on the width, then
  cat(tb[:, :, :p], x, tb[:, :, p:]) on the height.

Also builds tiny state dicts with the official key names and shapes.
"""

from __future__ import annotations

import numpy as np
import scipy.special

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------
# Tiny official state dicts.


def _batch_norm(state, name, channels, rng):
  state[f"{name}.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
  state[f"{name}.bias"] = rng.normal(0, 0.1, channels).astype(np.float32)
  state[f"{name}.running_mean"] = rng.normal(0, 0.1, channels).astype(np.float32)
  state[f"{name}.running_var"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
  state[f"{name}.num_batches_tracked"] = np.array(1234, np.int64)


def _conv(rng, out_channels, in_channels, kernel):
  fan_in = in_channels * kernel * kernel
  return rng.normal(0, 1 / np.sqrt(fan_in),
                    (out_channels, in_channels, kernel, kernel)).astype(np.float32)


def torch_resnet_state_dict(stem, widths, blocks, num_classes=10, seed=0) -> dict:
  """A torchvision ResNet (Bottleneck) state dict with random values."""
  rng = np.random.default_rng(seed)
  state = {"conv1.weight": _conv(rng, stem, 3, 7)}
  _batch_norm(state, "bn1", stem, rng)
  inplanes = stem
  for stage, (width, count) in enumerate(zip(widths, blocks), start=1):
    for index in range(count):
      block = f"layer{stage}.{index}"
      state[f"{block}.conv1.weight"] = _conv(rng, width, inplanes, 1)
      _batch_norm(state, f"{block}.bn1", width, rng)
      state[f"{block}.conv2.weight"] = _conv(rng, width, width, 3)
      _batch_norm(state, f"{block}.bn2", width, rng)
      state[f"{block}.conv3.weight"] = _conv(rng, 4 * width, width, 1)
      _batch_norm(state, f"{block}.bn3", 4 * width, rng)
      stride = 2 if stage > 1 and index == 0 else 1
      if stride != 1 or inplanes != 4 * width:
        state[f"{block}.downsample.0.weight"] = _conv(rng, 4 * width, inplanes, 1)
        _batch_norm(state, f"{block}.downsample.1", 4 * width, rng)
      inplanes = 4 * width
  state["fc.weight"] = rng.normal(0, 0.1, (num_classes, inplanes)).astype(np.float32)
  state["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
  return state


def torch_convnext_state_dict(dims, depths, num_classes=10, seed=0) -> dict:
  """A facebookresearch/ConvNeXt state dict (the file's "model" entry), random values.

  Layer scales are drawn around 1 (not the 1e-6 init) so every block matters.
  """
  rng = np.random.default_rng(seed)
  state = {}

  def norm(name, channels):
    state[f"{name}.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    state[f"{name}.bias"] = rng.normal(0, 0.1, channels).astype(np.float32)

  for stage, (dim, depth) in enumerate(zip(dims, depths)):
    if stage == 0:
      state["downsample_layers.0.0.weight"] = _conv(rng, dim, 3, 4)
      state["downsample_layers.0.0.bias"] = rng.normal(0, 0.1, dim).astype(np.float32)
      norm("downsample_layers.0.1", dim)
    else:
      norm(f"downsample_layers.{stage}.0", dims[stage - 1])
      state[f"downsample_layers.{stage}.1.weight"] = _conv(rng, dim, dims[stage - 1], 2)
      state[f"downsample_layers.{stage}.1.bias"] = rng.normal(0, 0.1, dim).astype(np.float32)
    for index in range(depth):
      block = f"stages.{stage}.{index}"
      state[f"{block}.dwconv.weight"] = _conv(rng, dim, 1, 7)
      state[f"{block}.dwconv.bias"] = rng.normal(0, 0.1, dim).astype(np.float32)
      norm(f"{block}.norm", dim)
      state[f"{block}.pwconv1.weight"] = rng.normal(
          0, 1 / np.sqrt(dim), (4 * dim, dim)).astype(np.float32)
      state[f"{block}.pwconv1.bias"] = rng.normal(0, 0.1, 4 * dim).astype(np.float32)
      state[f"{block}.pwconv2.weight"] = rng.normal(
          0, 1 / np.sqrt(4 * dim), (dim, 4 * dim)).astype(np.float32)
      state[f"{block}.pwconv2.bias"] = rng.normal(0, 0.1, dim).astype(np.float32)
      state[f"{block}.gamma"] = rng.uniform(0.5, 1.5, dim).astype(np.float32)
  norm("norm", dims[-1])
  state["head.weight"] = rng.normal(0, 0.1, (num_classes, dims[-1])).astype(np.float32)
  state["head.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
  return state


def torch_pad_prompts(image_size: int, p: int, seed=0) -> tuple[np.ndarray, np.ndarray]:
  """The reference's (tb, lr) prompt tensors, U(0, 1): (1, 3, 2p, S + 2p), (1, 3, S, 2p)."""
  rng = np.random.default_rng(seed)
  return (rng.uniform(0, 1, (1, 3, 2 * p, image_size + 2 * p)),
          rng.uniform(0, 1, (1, 3, image_size, 2 * p)))


# ----------------------------------------------------------------------------
# Layers (NCHW, float64).


def conv2d(x, weight, bias=None, stride=1, padding=0, groups=1):
  """PyTorch Conv2d: x (N, C, H, W), weight (O, C / groups, kh, kw)."""
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  n, channels, height, width = x.shape
  out_channels, group_channels, kh, kw = weight.shape
  oh, ow = (height - kh) // stride + 1, (width - kw) // stride + 1
  windows = np.stack([np.stack([x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                                for j in range(kw)]) for i in range(kh)])  # kh, kw, N, C, oh, ow
  windows = windows.reshape(kh, kw, n, groups, group_channels, oh, ow)
  weight = weight.reshape(groups, out_channels // groups, group_channels, kh, kw)
  out = np.einsum("ijngcyx,gocij->ngoyx", windows, weight).reshape(n, out_channels, oh, ow)
  if bias is not None:
    out = out + bias[None, :, None, None]
  return out


def max_pool_3x3_s2_p1(x):
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  oh, ow = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
  return np.max(np.stack([x[:, :, i:i + 2 * oh:2, j:j + 2 * ow:2]
                          for i in range(3) for j in range(3)]), axis=0)


def batch_norm_eval(x, state, name, eps=1e-5):
  shape = (1, -1, 1, 1)
  mean = state[f"{name}.running_mean"].reshape(shape)
  var = state[f"{name}.running_var"].reshape(shape)
  return ((x - mean) / np.sqrt(var + eps) * state[f"{name}.weight"].reshape(shape)
          + state[f"{name}.bias"].reshape(shape))


def layer_norm_last(x, weight, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def layer_norm_channels_first(x, weight, bias, eps=1e-6):
  return layer_norm_last(x.transpose(0, 2, 3, 1), weight, bias, eps).transpose(0, 3, 1, 2)


def relu(x):
  return np.maximum(x, 0)


def gelu(x):
  return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


# ----------------------------------------------------------------------------
# Networks.


def pad_with_prompts(x, tb, lr, p):
  """x (N, 3, S, S) -> (N, 3, S + 2p, S + 2p) as the reference's incorporate_prompt."""
  norm = lambda t: (t - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]
  tb = np.broadcast_to(norm(tb), (x.shape[0],) + tb.shape[1:])
  lr = np.broadcast_to(norm(lr), (x.shape[0],) + lr.shape[1:])
  x = np.concatenate([lr[:, :, :, :p], x, lr[:, :, :, p:]], axis=-1)
  return np.concatenate([tb[:, :, :p, :], x, tb[:, :, p:, :]], axis=-2)


def _state64(state):
  return {k: np.asarray(v, np.float64) for k, v in state.items()}


def resnet_features(state, images_nhwc, prompts=None, p=0):
  """Pooled features (N, C) of a torchvision ResNet state dict on NHWC images."""
  state = _state64(state)
  x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)
  if prompts is not None:
    x = pad_with_prompts(x, *prompts, p)
  x = relu(batch_norm_eval(conv2d(x, state["conv1.weight"], stride=2, padding=3), state, "bn1"))
  x = max_pool_3x3_s2_p1(x)
  stage = 1
  while f"layer{stage}.0.conv1.weight" in state:
    index = 0
    while f"layer{stage}.{index}.conv1.weight" in state:
      block = f"layer{stage}.{index}"
      stride = 2 if stage > 1 and index == 0 else 1
      y = relu(batch_norm_eval(conv2d(x, state[f"{block}.conv1.weight"]), state, f"{block}.bn1"))
      y = relu(batch_norm_eval(conv2d(y, state[f"{block}.conv2.weight"], stride=stride,
                                      padding=1), state, f"{block}.bn2"))
      y = batch_norm_eval(conv2d(y, state[f"{block}.conv3.weight"]), state, f"{block}.bn3")
      shortcut = x
      if f"{block}.downsample.0.weight" in state:
        shortcut = batch_norm_eval(
            conv2d(x, state[f"{block}.downsample.0.weight"], stride=stride),
            state, f"{block}.downsample.1")
      x = relu(y + shortcut)
      index += 1
    stage += 1
  return x.mean(axis=(2, 3))


def convnext_features(state, images_nhwc, prompts=None, p=0):
  """Final-LayerNorm features (N, C) of an official ConvNeXt state dict on NHWC images."""
  state = _state64(state)
  x = np.asarray(images_nhwc, np.float64).transpose(0, 3, 1, 2)
  if prompts is not None:
    x = pad_with_prompts(x, *prompts, p)
  stage = 0
  while f"stages.{stage}.0.dwconv.weight" in state:
    down = f"downsample_layers.{stage}"
    if stage == 0:
      x = conv2d(x, state[f"{down}.0.weight"], state[f"{down}.0.bias"], stride=4)
      x = layer_norm_channels_first(x, state[f"{down}.1.weight"], state[f"{down}.1.bias"])
    else:
      x = layer_norm_channels_first(x, state[f"{down}.0.weight"], state[f"{down}.0.bias"])
      x = conv2d(x, state[f"{down}.1.weight"], state[f"{down}.1.bias"], stride=2)
    index = 0
    while f"stages.{stage}.{index}.dwconv.weight" in state:
      block = f"stages.{stage}.{index}"
      y = conv2d(x, state[f"{block}.dwconv.weight"], state[f"{block}.dwconv.bias"],
                 padding=3, groups=x.shape[1]).transpose(0, 2, 3, 1)
      y = layer_norm_last(y, state[f"{block}.norm.weight"], state[f"{block}.norm.bias"])
      y = gelu(y @ state[f"{block}.pwconv1.weight"].T + state[f"{block}.pwconv1.bias"])
      y = y @ state[f"{block}.pwconv2.weight"].T + state[f"{block}.pwconv2.bias"]
      x = x + (state[f"{block}.gamma"] * y).transpose(0, 3, 1, 2)
      index += 1
    stage += 1
  return layer_norm_last(x.mean(axis=(2, 3)), state["norm.weight"], state["norm.bias"])
