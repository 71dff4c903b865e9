"""Pfeiffer adapters after every block's MLP (the VPT reference's baseline, vpt.md 1.9).

The MLP branch becomes y + Adapter(y), y = MLP(LN1 x); parameters
``Transformer/encoderblock_{i}/adapter/{down,up}/...``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from vpt_jax import errors
from vpt_jax.methods import base
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models import lean_ops

ADAPTER_PARAMS = r"Transformer/encoderblock_\d+/adapter/.*"
ADAPTER_INITS = ("default", "vpt_reference")


class Adapter(nn.Module):
  """Pfeiffer adapter (Pfeiffer et al., 2021) as the VPT reference's baseline (vpt.md 1.9).

  adapter(y) = Up(GELU(Down(y))), Down: Dense(D -> D // r), Up: Dense(D // r -> D),
  exact GELU; the block adds it to the MLP output before the MLP residual.

  ``init_scheme="vpt_reference"`` zero-initialises both projections, weights and
  biases, as KMnP/vpt does; then GELU(0) = 0 keeps Down's weights, Down's bias
  and Up's weights at exactly zero forever, and only Up's bias ever learns (the
  adapter degenerates to a learned per-block bias). ``"default"`` (a
  working adapter) draws Down's kernel xavier-uniform and keeps Up at zero, so
  the model still starts exactly at the backbone, and both projections learn.
  """
  reduction: int
  init_scheme: str = "default"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y):
    """(B, N, D) -> (B, N, D)."""
    width = y.shape[-1]
    if self.init_scheme not in ADAPTER_INITS:
      raise errors.UserError(f"Unknown adapter init {self.init_scheme!r}; choose one of "
                             f"{ADAPTER_INITS}")
    bottleneck = width // self.reduction if self.reduction >= 1 else 0
    if bottleneck < 1:
      raise errors.UserError(f"adapter reduction {self.reduction} leaves no bottleneck for width "
                             f"{width}; use a reduction between 1 and {width}")
    down_init = (nn.initializers.zeros if self.init_scheme == "vpt_reference"
                 else nn.initializers.xavier_uniform())
    h = nn.Dense(bottleneck, dtype=self.dtype, name="down", kernel_init=down_init,
                 bias_init=nn.initializers.zeros)(y)
    h = lean_ops.gelu(h)
    return nn.Dense(width, dtype=self.dtype, name="up", kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros)(h)


@dataclasses.dataclass(frozen=True)
class AdapterOptions(hooks_lib.Hooks):
  """Pfeiffer adapters of bottleneck width D // reduction; init in ADAPTER_INITS."""
  reduction: int = 8
  init: str = "default"

  def mlp_branch(self, branch, block):
    return branch + Adapter(self.reduction, self.init, dtype=block.dtype,
                            name="adapter")(branch)


def _read_settings(config) -> base.Settings:
  return dict(reduction=int(config.adapter.reduction), init=str(config.adapter.init))


def _check_settings(settings: base.Settings, spec, geometry: hooks_lib.Geometry) -> None:
  del spec
  if settings["init"] not in ADAPTER_INITS:
    base.fail(f"Unknown adapter.init {settings['init']!r}; choose one of {ADAPTER_INITS}")
  if not 1 <= settings["reduction"] <= geometry.width:
    base.fail(f"adapter.reduction {settings['reduction']} leaves no bottleneck for width "
              f"{geometry.width}; the paper uses 8, 64 or 256")


METHODS = (
    base.Method("adapter", base.train_only(ADAPTER_PARAMS), fresh=(ADAPTER_PARAMS,),
                optimizer="adamw", settings="adapter",
                description="Pfeiffer adapters after every block's MLP, plus the head",
                read_settings=_read_settings, settings_check=_check_settings,
                make_hooks=lambda spec: AdapterOptions(**spec["adapter"])),
)
