"""CVPT (Huang et al., "CVPT: Cross Visual Prompt Tuning", ICCV 2025; cvpt.md 1).

Per-block prompts (L, m, D), parameter ``cvpt/prompts``, that never enter the
token sequence: the tokens cross-attend to them with the block's own
attention module, CA(x) = Attention(q_in=x, kv_in=P), called a second time, so
it reads exactly the block's query/key/value/out parameters (cvpt.md 1.3-1.4);
no LayerNorm on x or P, no drop path on this branch. At ``insert`` (cvpt.md 1.2):

  1: x += CA(x); then x += DP(SA(LN0 x)); x += DP(MLP(LN1 x))
  2: x += DP(SA(LN0 x) + CA(x)); x += DP(MLP(LN1 x))
  3: x += DP(SA(LN0 x)); x += CA(x); x += DP(MLP(LN1 x))    (the reference default)
  4: x += DP(SA(LN0 x)); x += DP(MLP(LN1(x) + CA(x)))
  5: x += DP(SA(LN0 x)); x += DP(MLP(LN1 x)); x += CA(x)

CA treats every query row independently (its softmax runs over the prompts
only), so the backbone's ``num_outputs`` shortcut stays exact. CVPT keeps its
reference's stochastic depth (``cvpt.drop_path``) whenever training, uses the
PyTorch-style AdamW and the PyTorch default head init.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn

from vpt_jax.methods import base
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models.prompts import per_example_dropout, uniform_symmetric

CVPT_PARAMS = r"cvpt/.*"
CVPT_INSERTS = (1, 2, 3, 4, 5)


def xavier_uniform_3d_bound(shape) -> float:
  """torch.nn.init.xavier_uniform_'s bound for a 3-D tensor (A, B, C).

  PyTorch's fans for >2-D tensors: fan_in = B * C, fan_out = A * C, so the bound
  is sqrt(6 / (fan_in + fan_out)) = sqrt(6 / (C * (A + B))). For CVPT's
  (depth, m, D) prompts: sqrt(6 / (D * (m + depth))), e.g. 0.0188 for ViT-B
  with m = 10 (cvpt.md 1.5), not VPT's 0.0625.
  """
  a, b, c = shape
  return math.sqrt(6.0 / (c * (a + b)))


class CrossPrompts(nn.Module):
  """CVPT's per-block prompts, broadcast to the batch and dropped out.

  Parameter ``prompts`` (depth, m, width), xavier-uniform over the whole 3-D
  tensor as the reference's ``Prompt_Tokens`` (``xavier_uniform_3d_bound``).
  Returns (depth, B, m, width); dropout (0.1 in the reference) acts after the
  broadcast, so every example has its own mask, and only while training.
  """
  num_prompts: int
  depth: int
  width: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, batch_size: int, *, train: bool):
    if self.num_prompts < 1:
      raise ValueError(f"CVPT needs num_prompts >= 1, got {self.num_prompts}")
    shape = (self.depth, self.num_prompts, self.width)
    prompts = self.param("prompts", uniform_symmetric(xavier_uniform_3d_bound(shape)), shape)
    return per_example_dropout(prompts, batch_size, self.dropout_rate, train)


@dataclasses.dataclass(frozen=True)
class CvptOptions(hooks_lib.TrainingDropPath):
  """CVPT: m prompts per block, cross-attention at ``insert``, prompt dropout, drop path."""
  num_prompts: int = 10
  insert: int = 3
  dropout: float = 0.1

  def block_inputs(self, batch_size, geometry, dtype, *, train):
    prompts = CrossPrompts(self.num_prompts, geometry.depth, geometry.width,
                           dropout_rate=self.dropout, name="cvpt")(batch_size, train=train)
    return prompts.astype(dtype)

  @staticmethod
  def _cross(x, block: hooks_lib.BlockContext):
    """CA(x): (B, N, D) queries over this block's (B, m, D) prompts -> (B, N, D)."""
    return block.attention(x, block.inputs)

  def block_input(self, x, block):
    return x + self._cross(x, block) if self.insert == 1 else x

  def attention_branch(self, branch, x, block):
    return branch + self._cross(x, block) if self.insert == 2 else branch

  def after_attention(self, x, block):
    return x + self._cross(x, block) if self.insert == 3 else x

  def mlp_input(self, normed, x, block):
    return normed + self._cross(x, block) if self.insert == 4 else normed

  def block_output(self, x, block):
    return x + self._cross(x, block) if self.insert == 5 else x


def _read_settings(config) -> base.Settings:
  # m and the prompt dropout are the shared prompt fields (config.prompt).
  return dict(num_prompts=int(config.prompt.num_prompts), insert=int(config.cvpt.insert),
              dropout=float(config.prompt.dropout), drop_path=float(config.cvpt.drop_path))


def _check_settings(settings: base.Settings, spec, geometry) -> None:
  del spec, geometry
  if settings["num_prompts"] < 1:
    base.fail(f"cvpt needs prompt.num_prompts >= 1, got {settings['num_prompts']}")
  if settings["insert"] not in CVPT_INSERTS:
    base.fail(f"cvpt.insert must be one of {CVPT_INSERTS} (3 is the reference's), got "
              f"{settings['insert']}")


METHODS = (
    base.Method("cvpt", base.train_only(CVPT_PARAMS), fresh=(CVPT_PARAMS,),
                optimizer="torch_adamw", settings="cvpt", head_init="torch_default",
                description="CVPT: per-block prompts the tokens cross-attend to with the "
                            "block's own attention weights, plus the head",
                read_settings=_read_settings, settings_check=_check_settings,
                make_hooks=lambda spec: CvptOptions(**spec["cvpt"])),
)
