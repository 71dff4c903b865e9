"""RepAdapter: re-parameterisable adapters before attention and MLP (Luo et al., 2023).

As luogen1996/RepAdapter ``repadapter.py`` (method ``repblock``, its default):
x = x + DP(attn(A_attn(norm1(x)))), x = x + DP(mlp(A_mlp(norm2(x)))) with

  A(x) = conv_B(dropout(conv_A(x))) * s + x

conv_A a 1x1 conv D -> h (h = ``repadapter.dim`` = 8, xavier_uniform weight,
zero bias), conv_B a 1x1 conv h -> D with ``groups`` = 2 (zero weight and
bias: the model starts exact), dropout 0.1 while training. Parameters
``Transformer/encoderblock_{i}/repadapter_{attention,mlp}/{down,up}/...``, the
grouped kernel stored as (groups, h / groups, D / groups). At ViT-B/16:
24 x (768 x 8 + 8 + 4 x 768 + 768) = 239,808; the paper's 0.22M counts the
weights only (24 x 9,216 = 221,184).

Linear in x, so it folds into the following q/k/v resp. fc1 kernels and
biases (the official ``set_RepWeight``): W' = (I + s A B) W,
b' = s (a B + b_B) W + b. Drop path 0.1, AdamW lr 1e-3, wd 1e-4 (train.py);
per-task s in ``protocol.hparams.REPADAPTER_SCALES``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vpt_jax.methods import base
from vpt_jax.methods import reparam_common as common
from vpt_jax.models import hooks as hooks_lib

REPADAPTER_PARAMS = r"Transformer/encoderblock_\d+/repadapter_(attention|mlp)/.*"


class GroupedDense(nn.Module):
  """torch Conv1d(h, D, 1, groups): kernel (groups, h / groups, D / groups), zeros; bias zeros."""
  groups: int
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.zeros,
                        (self.groups, x.shape[-1] // self.groups, self.features // self.groups))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    grouped = x.reshape(x.shape[:-1] + (self.groups, -1))
    out = jnp.einsum("...gi,gio->...go", grouped, kernel.astype(x.dtype))
    return out.reshape(x.shape[:-1] + (self.features,)) + bias.astype(x.dtype)


class RepAdapter(nn.Module):
  """x (..., D) -> x + s * (GroupDense(dropout(Dense(x)))), h hidden features in ``groups``."""
  dim: int
  groups: int
  scale: float
  dropout: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    hidden = nn.Dense(self.dim, dtype=x.dtype, kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=nn.initializers.zeros, name="down")(x)
    hidden = nn.Dropout(self.dropout)(hidden, deterministic=not train)
    return x + self.scale * GroupedDense(self.groups, width, name="up")(hidden)


@dataclasses.dataclass(frozen=True)
class RepAdapterOptions(hooks_lib.TrainingDropPath):
  """A RepAdapter on the normalised input of attention and of the MLP."""
  dim: int = 8
  groups: int = 2
  scale: float = 1.0
  dropout: float = 0.1

  def _adapter(self, name):
    return RepAdapter(self.dim, self.groups, self.scale, self.dropout, name=name)

  def attention_input(self, normed, block):
    return self._adapter("repadapter_attention")(normed, train=block.train)

  def mlp_input(self, normed, x, block):
    del x
    return self._adapter("repadapter_mlp")(normed, train=block.train)


def dense_map(adapter: dict, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """The adapter as x -> x M + c: (M (D, D), c (D,)) float64 (``set_RepWeight``)."""
  f64 = lambda a: np.asarray(a, np.float64)
  grouped = f64(adapter["up/kernel"])  # (g, h/g, D/g)
  groups, per_group, out_per_group = grouped.shape
  up = np.zeros((groups * per_group, groups * out_per_group))
  for g in range(groups):
    up[g * per_group:(g + 1) * per_group, g * out_per_group:(g + 1) * out_per_group] = grouped[g]
  down, down_bias = f64(adapter["down/kernel"]), f64(adapter["down/bias"])
  matrix = np.eye(down.shape[0]) + scale * down @ up
  return matrix, scale * (down_bias @ up + f64(adapter["up/bias"]))


_FOLLOWING = {"attention": ("MultiHeadDotProductAttention_0/query",
                            "MultiHeadDotProductAttention_0/key",
                            "MultiHeadDotProductAttention_0/value"),
              "mlp": ("MlpBlock_0/Dense_0",)}


def merge(spec, flat: dict) -> dict:
  """Folds every adapter into the linear maps that read its output (W' = M W, b' = c W + b)."""
  scale = float(spec["repadapter"]["scale"])
  flat = dict(flat)
  for path in [p for p in flat if p.endswith("/down/kernel") and "/repadapter_" in p]:
    prefix = path[:-len("/down/kernel")]
    block, where = prefix.rsplit("/repadapter_", 1)
    adapter = {k[len(prefix) + 1:]: flat.pop(k) for k in list(flat) if k.startswith(prefix + "/")}
    matrix, offset = dense_map(adapter, scale)
    for target in _FOLLOWING[where]:
      kernel = np.asarray(flat[f"{block}/{target}/kernel"], np.float64)
      shape = kernel.shape
      kernel = kernel.reshape(shape[0], -1)
      flat[f"{block}/{target}/kernel"] = (matrix @ kernel).reshape(shape)
      bias = np.asarray(flat[f"{block}/{target}/bias"], np.float64)
      flat[f"{block}/{target}/bias"] = (offset @ kernel).reshape(bias.shape) + bias
  return flat


def _read_settings(config) -> base.Settings:
  section = config.repadapter
  return dict(dim=int(section.dim), groups=int(section.groups), scale=float(section.scale),
              dropout=float(section.dropout), drop_path=common.read_drop_path(section))


def _check_settings(settings: base.Settings, spec, geometry) -> None:
  del spec
  dim, groups = settings["dim"], settings["groups"]
  if dim < 1 or groups < 1 or dim % groups or geometry.width % groups:
    base.fail(f"repadapter.dim={dim} and the width {geometry.width} must both be multiples "
              f"of repadapter.groups={groups} (the official dim 8, groups 2)")
  if not 0.0 <= settings["dropout"] < 1.0:
    base.fail(f"repadapter.dropout={settings['dropout']} must lie in [0, 1) (the official 0.1)")
  common.check_drop_path("repadapter", settings["drop_path"])


METHODS = (
    base.Method("repadapter", base.train_only(REPADAPTER_PARAMS), fresh=(REPADAPTER_PARAMS,),
                optimizer=common.OPTIMIZER, settings="repadapter",
                description="RepAdapter: group-wise linear adapters before attention and MLP, "
                            "plus the head",
                read_settings=_read_settings, settings_check=_check_settings,
                make_hooks=lambda spec: RepAdapterOptions(**spec["repadapter"]), merge=merge),
)
