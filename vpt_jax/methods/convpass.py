"""Convpass: convolutional bypasses beside attention and MLP (Jie & Deng 2022).

As JieShibo/PETL-ViT ``convpass/vtab/convpass.py`` (``set_Convpass``,
method "convpass"), each block becomes

    x <- x + Attn(LN0 x) + s * Convpass_a(LN0 x)
    x <- x + MLP(LN1 x)  + s * Convpass_m(LN1 x)

Convpass(y) = Up(dropout(QGELU(Conv3x3(QGELU(Down(y)))))), Down D -> d,
a 3 x 3 convolution (stride 1, zero padding 1, d -> d channels) over the patch
tokens laid out as their square grid, Up d -> D, QGELU x sigmoid(1.702 x),
dropout 0.1 while training. The CLS token is convolved on its own, as a 1 x 1
image with the same padded kernel: only the kernel's centre tap reaches it, so
CLS never mixes with the patches (which is why the CLS-only last block of
``skip_dead_work`` stays exact). Init: Down xavier-uniform, Up and every bias
zero (the model starts at the backbone); the convolution either the
identity at its centre tap (``conv_init="identity"``, the code's
``xavier_init=False``) or xavier-uniform. d = 8 and s per task in the official
configs (``protocol/hparams.py``). Parameters
``Transformer/encoderblock_{i}/convpass_{attention,mlp}/{down,conv,up}/...``.

While training, ``backbone_drop_path`` (0.1, the code's timm drop_path_rate,
linear over the blocks) drops the frozen attention/MLP branches and, with
independent draws as the code's separate ``drop_path`` calls, each bypass.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from vpt_jax.methods import adapter_parts
from vpt_jax.methods import base
from vpt_jax.models import hooks as hooks_lib

CONVPASS_PARAMS = r"Transformer/encoderblock_\d+/convpass_(attention|mlp)/.*"
CONV_INITS = ("identity", "xavier")


def _identity_centre(key, shape, dtype=jnp.float32):
  """(3, 3, d, d): zero except the identity at the centre tap."""
  del key
  return jnp.zeros(shape, dtype).at[1, 1].set(jnp.eye(shape[2], shape[3], dtype=dtype))


def token_grid(num_tokens: int) -> int:
  """The side g of the patch grid of [CLS, g x g patches]; 0 for CLS alone."""
  side = math.isqrt(max(num_tokens - 1, 0))
  if side * side != num_tokens - 1:
    raise ValueError(f"Convpass lays the {num_tokens - 1} patch tokens out as a square grid; "
                     "use a square image whose size is a multiple of the patch size")
  return side


class Convpass(nn.Module):
  """One convolutional bypass: (B, N, D) normalised tokens -> (B, N, D), unscaled."""
  bottleneck: int
  conv_init: str = "identity"
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y, train: bool = False):
    batch, num_tokens, width = y.shape
    side = token_grid(num_tokens)
    down_kernel, down_bias, up_kernel, up_bias = adapter_parts.projection_inits(
        "lora_xavier", width)
    h = nn.Dense(self.bottleneck, dtype=self.dtype, name="down", kernel_init=down_kernel,
                 bias_init=down_bias)(y)
    h = adapter_parts.quick_gelu(h)
    conv = nn.Conv(self.bottleneck, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   name="conv", bias_init=nn.initializers.zeros,
                   kernel_init=(_identity_centre if self.conv_init == "identity"
                                else nn.initializers.xavier_uniform()))
    cls = conv(h[:, :1].reshape(batch, 1, 1, self.bottleneck)).reshape(batch, 1, -1)
    if side:
      patches = conv(h[:, 1:].reshape(batch, side, side, self.bottleneck))
      cls = jnp.concatenate([cls, patches.reshape(batch, side * side, -1)], axis=1)
    h = nn.Dropout(self.dropout)(adapter_parts.quick_gelu(cls), deterministic=not train)
    return nn.Dense(width, dtype=self.dtype, name="up", kernel_init=up_kernel,
                    bias_init=up_bias)(h)


@dataclasses.dataclass(frozen=True)
class ConvpassOptions(adapter_parts.StochasticHooks):
  """Convpass beside attention and MLP: scale * Convpass(LN x) added to the stream."""
  bottleneck: int = 8
  scale: float = 1.0
  conv_init: str = "identity"
  dropout: float = 0.1
  backbone_drop_path: float = 0.1

  def _bypass(self, normed, block, name):
    bypass = Convpass(self.bottleneck, self.conv_init, self.dropout, dtype=block.dtype,
                      name=name)(normed, block.train)
    # Its own drop path at the block's rate, drawn independently of the frozen branch's.
    bypass = adapter_parts.drop_path(bypass, block.drop_path, block.train)
    return bypass * jnp.asarray(self.scale, bypass.dtype)

  def attention_parallel(self, normed, x, block):
    return self._bypass(normed, block, "convpass_attention")

  def mlp_parallel(self, normed, x, block):
    return self._bypass(normed, block, "convpass_mlp")


def _read_settings(config) -> base.Settings:
  section = config.convpass
  return dict(bottleneck=int(section.bottleneck), scale=float(section.scale),
              conv_init=str(section.conv_init), dropout=float(section.dropout),
              backbone_drop_path=float(section.backbone_drop_path))


def _check_settings(settings: base.Settings, spec, geometry: hooks_lib.Geometry) -> None:
  del spec
  adapter_parts.check_bottleneck("convpass", settings["bottleneck"], geometry.width)
  for rate in ("dropout", "backbone_drop_path"):
    adapter_parts.check_rate(f"convpass.{rate}", settings[rate])
  if settings["conv_init"] not in CONV_INITS:
    base.fail(f"Unknown convpass.conv_init {settings['conv_init']!r}; choose one of "
              f"{CONV_INITS}")


METHODS = (
    base.Method("convpass", base.train_only(CONVPASS_PARAMS), fresh=(CONVPASS_PARAMS,),
                optimizer="torch_adamw", settings="convpass",
                description="Convpass: 3x3 convolutional bypasses beside every attention and "
                            "MLP, plus the head",
                read_settings=_read_settings, settings_check=_check_settings,
                make_hooks=lambda spec: ConvpassOptions(**spec["convpass"])),
)
