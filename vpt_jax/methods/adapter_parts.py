"""Pieces the bottleneck-adapter methods share: inits, activations, method dropout.

The adapters' own dropout (and Adapter+'s and Convpass's drop path) is active
only while training: ``StochasticHooks`` switches the backbone's stochastic
depth on whenever training, so the blocks hand their hooks
``BlockContext.train`` (and the block's ramped ``drop_path`` rate), as
``hooks.TrainingDropPath`` does for CVPT and the re-parameterisable methods
(whose rate is their ``drop_path``; the adapters' is ``backbone_drop_path``,
as Adapter+'s ``drop_path`` is its own).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt_jax import errors
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models import lean_ops
from vpt_jax.models.prompts import uniform_symmetric

# The projections' initialisations, by the official codes' names:
# * "xavier" (OSU ViT_PEFT_Vision's init_weight 'xavier', its Houlsby adapter):
#   both kernels xavier-uniform, both biases N(0, 1e-6^2);
# * "lora" (AdaptFormer's 'lora', OSU's 'lora_kaiming'): Down kaiming_uniform
#   (a = sqrt(5)) = U(+-1/sqrt(fan_in)), Up and both biases zero;
# * "lora_xavier" (Convpass): Down xavier-uniform, Up and both biases zero;
# * "houlsby" (Adapter+): both kernels N(0, 0.01^2) truncated at +-2 std, biases zero.
INITS = ("xavier", "lora", "lora_xavier", "houlsby")
HOULSBY_STD = 0.01


def _houlsby_normal(key, shape, dtype=jnp.float32):
  """torch trunc_normal_(std=0.01, a=-0.02, b=0.02): N(0, 0.01^2) cut at +-2 std."""
  return HOULSBY_STD * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)


def projection_inits(scheme: str, fan_in: int):
  """(down kernel, down bias, up kernel, up bias) initialisers of ``scheme`` (INITS)."""
  zeros = nn.initializers.zeros
  if scheme == "xavier":
    tiny = nn.initializers.normal(stddev=1e-6)
    return (nn.initializers.xavier_uniform(), tiny, nn.initializers.xavier_uniform(), tiny)
  if scheme == "lora":
    return uniform_symmetric(1.0 / math.sqrt(fan_in)), zeros, zeros, zeros
  if scheme == "lora_xavier":
    return nn.initializers.xavier_uniform(), zeros, zeros, zeros
  if scheme == "houlsby":
    return _houlsby_normal, zeros, _houlsby_normal, zeros
  raise ValueError(f"Unknown adapter init {scheme!r}; choose one of {INITS}")


def quick_gelu(x):
  """CLIP's QuickGELU, x * sigmoid(1.702 x) (Convpass's activation)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"relu": nn.relu, "gelu": lean_ops.gelu,
               "quick_gelu": quick_gelu}


@dataclasses.dataclass(frozen=True)
class StochasticHooks(hooks_lib.Hooks):
  """The adapters' training-time randomness: their own dropout and the backbone's drop path.

  ``backbone_drop_path`` is the official codes' stochastic depth on the frozen
  branches while training (timm's linear ramp over the blocks, 0 at the
  first). It is switched on whenever training (at rate 0 it drops nothing),
  so the block hooks see ``BlockContext.train`` for the adapters' own dropout.
  """
  backbone_drop_path: float = 0.0

  def stochastic_depth(self, rate, deterministic, *, train):
    del rate, deterministic  # the method's own, whenever training
    return self.backbone_drop_path, not train


def drop_path(x, rate: float, train: bool):
  """Stochastic depth: per example, x is zeroed with probability ``rate`` (else scaled).

  Call it inside a module's ``@nn.compact`` method; draws from the "dropout"
  rng while ``train``, else x unchanged.
  """
  return nn.Dropout(rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=not train)


def bottleneck(x, features: int, activation: str, init: str, dropout_rate: float = 0.0,
               train: bool = False, dtype=jnp.float32):
  """Up(dropout(act(Down(x)))): (..., D) -> (..., D), D -> ``features`` -> D.

  Call it inside a module's ``@nn.compact`` method: it adds that module's
  ``down/{kernel,bias}`` and ``up/{kernel,bias}``, initialised by ``init``
  (INITS); ``activation`` a key of ACTIVATIONS; dropout on the bottleneck
  activations at ``dropout_rate`` while ``train``.
  """
  width = x.shape[-1]
  down_kernel, down_bias, up_kernel, up_bias = projection_inits(init, width)
  h = nn.Dense(features, dtype=dtype, name="down", kernel_init=down_kernel,
               bias_init=down_bias)(x)
  h = nn.Dropout(dropout_rate)(ACTIVATIONS[activation](h), deterministic=not train)
  return nn.Dense(width, dtype=dtype, name="up", kernel_init=up_kernel, bias_init=up_bias)(h)


class Bottleneck(nn.Module):
  """``bottleneck`` as a module of its own (its parameters under its name)."""
  features: int
  activation: str
  init: str
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    return bottleneck(x, self.features, self.activation, self.init, self.dropout_rate, train,
                      self.dtype)


def check_bottleneck(section: str, features: int, width: int) -> None:
  """Refuses a bottleneck that does not fit the backbone width."""
  if not 1 <= features <= width:
    raise errors.UserError(f"{section}.bottleneck {features} must be between 1 and the width "
                           f"{width}; set --config.{section}.bottleneck in that range")


def check_rate(name: str, rate: float) -> None:
  """Refuses a dropout / drop-path rate outside [0, 1)."""
  if not 0.0 <= rate < 1.0:
    raise errors.UserError(f"{name} {rate} must be in [0, 1); set --config.{name} in that range")
