"""SSF: scale and shift every operation's features (Lian et al., NeurIPS 2022).

As dongzelian/SSF models/vision_transformer.py places them (``tuning_mode ==
'ssf'``): y -> y * gamma + beta over the last (channel) axis after the patch
embedding, after each block's LayerNorms, after the attention's q/k/v
projections (the official fused qkv's 3D-vector is our query/key/value
parameters, D each), after its out projection, after the MLP's two Dense
layers, and after the final norm (``encoder_norm``). gamma ~ N(1, 0.02^2),
beta ~ N(0, 0.02^2) (``init_ssf_scale_shift``). Parameters
``.../ssf_{operation}/{scale,shift}`` beside the operation they follow; at
ViT-B/16 that is 2 x (12 x 11 + 2) x 768 = 205,824 (the paper's 0.2M).

Each scale and shift is linear in the preceding operation's weights, so the
trained model merges into the plain ViT (``merge``). The official VTAB-1k
scripts train with drop path 0.1 (``ssf.drop_path``), batch 32 and timm's
AdamW, which leaves 1-D tensors (every SSF parameter) undecayed
(``timm_adamw``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vpt_jax.methods import base
from vpt_jax.methods import reparam_common as common
from vpt_jax.models import hooks as hooks_lib

SSF_PARAMS = r"(.*/)?ssf_[A-Za-z0-9_]+/(scale|shift)"
SSF_STDDEV = 0.02


class ScaleShift(nn.Module):
  """x (..., *features) -> x * scale + shift, scale ~ N(1, 0.02^2), shift ~ N(0, 0.02^2)."""
  features: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", common.normal(1.0, SSF_STDDEV), self.features)
    shift = self.param("shift", common.normal(0.0, SSF_STDDEV), self.features)
    return x * scale.astype(self.dtype) + shift.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class SsfOptions(hooks_lib.TrainingDropPath):
  """SSF after every linear map and LayerNorm of the ViT."""
  changes_mlp_projections = True

  def projection_output(self, name, inputs, outputs, out_features, num_in_axes, dtype,
                        block=None):
    del inputs, num_in_axes, block
    return ScaleShift(tuple(out_features), dtype, name=f"ssf_{name}")(outputs)

  def norm_output(self, name, normed):
    return ScaleShift((normed.shape[-1],), normed.dtype, name=f"ssf_{name}")(normed)


def _fold_into(flat: dict, prefix: str, op: str, kernel_key: str) -> None:
  """Folds ``{prefix}ssf_{op}`` into ``{prefix}{op}``'s kernel (or scale) and bias."""
  scale = np.asarray(flat.pop(f"{prefix}ssf_{op}/scale"), np.float64)
  shift = np.asarray(flat.pop(f"{prefix}ssf_{op}/shift"), np.float64)
  weight = np.asarray(flat[f"{prefix}{op}/{kernel_key}"], np.float64)
  bias = np.asarray(flat[f"{prefix}{op}/bias"], np.float64)
  # The output features are the kernel's trailing axes (all of a LayerNorm scale's).
  flat[f"{prefix}{op}/{kernel_key}"] = weight * scale
  flat[f"{prefix}{op}/bias"] = bias * scale + shift


def merge(spec, flat: dict) -> dict:
  """Flat params with every SSF folded into its operation (plain ViT names), float64.

  (x W + b) * s + t = x (W s) + (b s + t); LayerNorm's gamma and beta likewise.
  """
  del spec
  flat = dict(flat)
  for path in [p for p in flat if p.endswith("/scale") and "ssf_" in p]:
    prefix, op = path[:-len("/scale")].rsplit("ssf_", 1)
    is_norm = "LayerNorm" in op or op.endswith("norm")
    _fold_into(flat, prefix, op, "scale" if is_norm else "kernel")
  return flat


def _check_settings(settings: base.Settings, spec, geometry) -> None:
  del spec, geometry
  common.check_drop_path("ssf", settings["drop_path"])


METHODS = (
    base.Method("ssf", base.train_only(SSF_PARAMS), fresh=(SSF_PARAMS,),
                optimizer="timm_adamw", settings="ssf",
                description="SSF: a scale and shift after every linear map and LayerNorm, "
                            "plus the head",
                read_settings=lambda config: dict(drop_path=common.read_drop_path(config.ssf)),
                settings_check=_check_settings,
                make_hooks=lambda spec: SsfOptions(**spec["ssf"]), merge=merge),
)
