"""DiffFit and LN-tune: biases, LayerNorms and per-block scale factors, or the LayerNorms alone.

DiffFit (Xie et al., ICCV 2023), as OSU-MLB/ViT_PEFT_Vision implements it for
ViTs (``model/block.py``, ``experiment/build_model.py``): every bias vector,
every LayerNorm (scale and bias) and two per-block vectors gamma1, gamma2 in
R^D, initialised to ones, that scale the attention and MLP branches before
their residuals, x = gamma1 * DP(SA(LN0 x)) + x (the paper's DiT places gamma
the same way). Parameters ``Transformer/encoderblock_{i}/difffit_{attention,
mlp}/gamma``; 140,544 at ViT-B/16 besides the head.

LN-tune (OSU's ``ln``): every LayerNorm's scale and bias, 38,400 at ViT-B/16.

Both train with OSU's defaults: stochastic depth 0.1 and AdamW. Both merge
into the plain ViT: gamma folds into the out projection resp. Dense_1 (their
kernels and biases scale by gamma); the rest are backbone parameters.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import numpy as np

from vpt_jax.methods import base
from vpt_jax.methods import reparam_common as common
from vpt_jax.models import hooks as hooks_lib

GAMMA_PARAMS = r"Transformer/encoderblock_\d+/difffit_(attention|mlp)/gamma"
# The projection each branch ends in, where its gamma folds.
_BRANCH_OUTPUT = {"attention": "MultiHeadDotProductAttention_0/out",
                  "mlp": "MlpBlock_0/Dense_1"}


class Gamma(nn.Module):
  """x (..., D) -> x * gamma, gamma (D,) initialised to ones."""

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],))
    return x * gamma.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class DiffFitOptions(hooks_lib.TrainingDropPath):
  """gamma1 on the attention branch, gamma2 on the MLP branch of every block."""

  def attention_branch(self, branch, x, block):
    del x, block
    return Gamma(name="difffit_attention")(branch)

  def mlp_branch(self, branch, block):
    del block
    return Gamma(name="difffit_mlp")(branch)


def merge_difffit(spec, flat: dict) -> dict:
  """Folds every gamma into the projection its branch ends in (kernel and bias * gamma)."""
  del spec
  flat = dict(flat)
  for path in [p for p in flat if p.endswith("/gamma") and "/difffit_" in p]:
    block, branch = path[:-len("/gamma")].rsplit("/difffit_", 1)
    gamma = np.asarray(flat.pop(path), np.float64)
    for leaf in ("kernel", "bias"):
      key = f"{block}/{_BRANCH_OUTPUT[branch]}/{leaf}"
      flat[key] = np.asarray(flat[key], np.float64) * gamma
  return flat


def _settings(config_section):
  return lambda config: dict(drop_path=common.read_drop_path(config[config_section]))


def _check(method: str):
  def check(settings: base.Settings, spec, geometry) -> None:
    del spec, geometry
    common.check_drop_path(method, settings["drop_path"])
  return check


METHODS = (
    base.Method("difffit", base.train_only(base.BIAS_PARAMS, common.LAYER_NORM_PARAMS,
                                           GAMMA_PARAMS),
                fresh=(GAMMA_PARAMS,), optimizer=common.OPTIMIZER, settings="difffit",
                description="DiffFit: biases, LayerNorms and per-block branch scales, plus "
                            "the head",
                read_settings=_settings("difffit"), settings_check=_check("difffit"),
                make_hooks=lambda spec: DiffFitOptions(**spec["difffit"]),
                merge=merge_difffit),
    base.Method("ln_tune", base.train_only(common.LAYER_NORM_PARAMS),
                optimizer=common.OPTIMIZER, settings="ln_tune",
                description="LN-tune: every LayerNorm's scale and bias, plus the head",
                read_settings=_settings("ln_tune"), settings_check=_check("ln_tune"),
                make_hooks=lambda spec: hooks_lib.TrainingDropPath(**spec["ln_tune"]),
                merge=base.nothing_to_fold),
)
