"""LoRA on the attention projections (Hu et al., "LoRA", ICLR 2022).

Each targeted projection P (query, key, value, out) becomes P(x) + LoRA_P(x);
parameters ``Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/
lora_{target}/{a,b}``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vpt_jax.methods import base
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models.prompts import uniform_symmetric

LORA_PARAMS = r"Transformer/encoderblock_\d+/MultiHeadDotProductAttention_0/lora_[a-z]+/.*"
LORA_TARGETS = ("query", "key", "value", "out")


class LoRA(nn.Module):
  """Low-rank update of a frozen projection.

  delta(x) = (alpha / r) * (x . A) . B with A of shape (in..., r) drawn as the
  LoRA reference's kaiming_uniform(a=sqrt(5)) on (r, fan_in), i.e.
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and B of shape (r, out...) zero, so
  W + (alpha / r) A B equals W at initialisation and the model starts exact.
  ``x`` is (..., in...) with ``num_in_axes`` trailing input axes.
  """
  rank: int
  alpha: float
  out_features: tuple[int, ...]
  num_in_axes: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.num_in_axes:]
    fan_in = int(np.prod(in_shape))
    a = self.param("a", uniform_symmetric(1.0 / math.sqrt(fan_in)), in_shape + (self.rank,))
    b = self.param("b", nn.initializers.zeros, (self.rank,) + tuple(self.out_features))
    low = jnp.tensordot(x, a.astype(self.dtype), axes=self.num_in_axes)
    return jnp.tensordot(low, b.astype(self.dtype), axes=1) * (self.alpha / self.rank)


@dataclasses.dataclass(frozen=True)
class LoraOptions(hooks_lib.Hooks):
  """LoRA on the attention projections named in ``targets`` (subset of LORA_TARGETS)."""
  rank: int = 8
  alpha: float = 8.0
  targets: tuple[str, ...] = ("query", "value")

  def projection_output(self, name, inputs, outputs, out_features, num_in_axes, dtype,
                        block=None):
    del block
    if name not in self.targets:
      return outputs
    return outputs + LoRA(self.rank, self.alpha, out_features, num_in_axes, dtype=dtype,
                          name=f"lora_{name}")(inputs)


def merge(spec, flat: dict) -> dict:
  """Folds every LoRA pair into its projection: W + (alpha / r) A B (float64)."""
  flat = dict(flat)
  alpha = float(spec["lora"]["alpha"])
  for path in [p for p in flat if re.search(r"/lora_[a-z]+/a$", p)]:
    a = np.asarray(flat.pop(path), np.float64)
    b = np.asarray(flat.pop(path[:-1] + "b"), np.float64)
    attention, target = path[:-len("/a")].rsplit("/lora_", 1)
    kernel = f"{attention}/{target}/kernel"
    flat[kernel] = np.asarray(flat[kernel], np.float64) + (alpha / a.shape[-1]) * np.tensordot(
        a, b, axes=1)
  return flat


def _read_settings(config) -> base.Settings:
  return dict(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
              targets=base.names(config.lora.targets))


def _check_settings(settings: base.Settings, spec, geometry) -> None:
  del spec, geometry
  unknown = sorted(set(settings["targets"]) - set(LORA_TARGETS))
  if unknown or not settings["targets"]:
    base.fail(f"lora.targets {settings['targets']} must be a non-empty comma-separated subset "
              f"of {', '.join(LORA_TARGETS)}")
  if settings["rank"] < 1:
    base.fail(f"lora.rank must be >= 1, got {settings['rank']}")


def _hooks(spec) -> LoraOptions:
  settings = spec["lora"]
  # JSON turns tuples into lists; hook objects must stay hashable.
  return LoraOptions(settings["rank"], settings["alpha"], tuple(settings["targets"]))


METHODS = (
    base.Method("lora", base.train_only(LORA_PARAMS), fresh=(LORA_PARAMS,), optimizer="adamw",
                settings="lora",
                description="LoRA: low-rank updates of the attention projections, plus the "
                            "head",
                read_settings=_read_settings, settings_check=_check_settings,
                make_hooks=_hooks, merge=merge),
)
