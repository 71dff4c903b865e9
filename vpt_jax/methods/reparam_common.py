"""What the re-parameterisable methods (SSF, DiffFit, LN-tune, FacT, RepAdapter) share.

Their official code trains with timm's stochastic depth 0.1 on the frozen
backbone (``create_model(..., drop_path_rate=0.1)``; OSU ViT_PEFT_Vision's
``drop_path_rate: 0.1``), so their hook objects switch it on while training
(``hooks.TrainingDropPath``), which also turns on their own dropout
(``hooks.BlockContext.train``). They all train with torch.optim.AdamW.
"""

from __future__ import annotations

import jax

from vpt_jax.methods import base
from vpt_jax.models import hooks as hooks_lib

# Every LayerNorm's scale and bias: the blocks', encoder_norm and MAE's fc_norm
# (OSU ViT_PEFT_Vision tunes every parameter whose name holds "norm").
LAYER_NORM_PARAMS = (r"(Transformer/encoderblock_\d+/LayerNorm_\d+|Transformer/encoder_norm|"
                     r"fc_norm)/(scale|bias)")
OPTIMIZER = "torch_adamw"


def normal(mean: float, stddev: float):
  """Initializer drawing N(mean, stddev^2), torch.nn.init.normal_(t, mean, std)."""
  def init(key, shape, dtype=jax.numpy.float32):
    return mean + stddev * jax.random.normal(key, shape, dtype)
  return init


def read_drop_path(section) -> float:
  """A config section's ``drop_path``."""
  return float(section.drop_path)


def check_drop_path(method: str, rate: float) -> None:
  """Refuses a stochastic-depth rate outside [0, 1)."""
  if not 0.0 <= rate < 1.0:
    base.fail(f"{method}.drop_path={rate} must lie in [0, 1) (the official {hooks_lib.TRAINING_DROP_PATH})")
