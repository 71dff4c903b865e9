"""VQT: Visual Query Tuning (Tu et al., CVPR 2023), as its official code.

The reference (andytu28/VQT ``h2t_vit.py``, Head2Toe encoder): every block l
gets T learnable query tokens Q_l (depth, T, D), drawn U(-v, v) with VPT's
bound v = sqrt(6 / (3 P^2 + D)) and dropped out per example (``vqt.dropout``,
0.1 in its scripts). They are prepended to the block's input and go through
the whole block (both LayerNorms, attention, MLP, residuals), but the keys
and values are the block's other tokens only: the queries read the layer and
change nothing in it (the backbone's forward is exactly the frozen one), and
their outputs are collected and never enter the next block.

The head reads (``vqt.combine``):

* ``concat`` (the reference's default): [CLS after encoder_norm, Z_1, ..., Z_L]
  with Z_l the T outputs of block l flattened to T D, each of the L + 1 vectors
  L2-normalised (``NORMALIZE_FEATS``), D (1 + L T) features;
* ``mean`` (``POOLING_FEATS``): Z_l = the mean of block l's T outputs;
* ``weighted_sum`` (``WEIGHTED_SUM_FEATS``): Z_l = sum_t c[l, t] q_{l,t}, c
  (depth, T) starting at ones and trained;
* ``osu`` (OSU-MLB/ViT_PEFT_Vision ``vqt.py``): the L T query outputs and
  CLS, each L2-normalised, summed with weights w (L T + 1) starting at ones
  (its bias-free ``combine_layer``): D features. OSU's forward strips the
  queries from the sequence *before* it collects ``x[:, :T]``, so it collects
  CLS and the first patch tokens instead of the query outputs; we collect the
  query outputs, as the paper and the official code do.

The reference trains the queries and the head (and c) with torch Adam (its
scripts' ``adam``, coupled L2 decay), which this library does not offer: the
default here is its config's SGD, whose grid its ``head2toe_train.py`` also
lists (lr {50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05} x wd {0.01, 1e-3, 1e-4, 0}).
Parameters: ``vqt/queries`` and ``vqt_head/combine`` (weighted_sum, osu).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from vpt_jax.methods import base
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models.prompts import per_example_dropout, prompt_init_bound, uniform_symmetric

# The query tokens (vqt/queries) and the head-side weights (vqt_head/combine).
VQT_PARAMS = r"vqt(_head)?/.*"
COMBINES = ("concat", "mean", "weighted_sum", "osu")


def l2_normalize(x, axis=-1, epsilon=1e-12):
  """torch's F.normalize: x / max(||x||_2, epsilon)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), epsilon)


class VqtCombine(nn.Module):
  """CLS (B, D) and query outputs (L, B, T, D) -> the head's input (see the module doc)."""
  combine: str

  @nn.compact
  def __call__(self, cls, queries):
    depth, batch, tokens, width = queries.shape
    if self.combine == "osu":
      vectors = jnp.concatenate(
          [jnp.swapaxes(queries, 0, 1).reshape(batch, depth * tokens, width), cls[:, None]],
          axis=1)
      weights = self.param("combine", nn.initializers.ones, (depth * tokens + 1,))
      return jnp.einsum("bnd,n->bd", l2_normalize(vectors), weights)
    if self.combine == "concat":
      per_layer = jnp.swapaxes(queries, 0, 1).reshape(batch, depth, tokens * width)
    elif self.combine == "mean":
      per_layer = jnp.swapaxes(queries.mean(axis=2), 0, 1)
    elif self.combine == "weighted_sum":
      weights = self.param("combine", nn.initializers.ones, (depth, tokens))
      per_layer = jnp.einsum("lbtd,lt->bld", queries, weights)
    else:
      raise ValueError(f"Unknown vqt.combine {self.combine!r}; choose one of {COMBINES}")
    return jnp.concatenate([l2_normalize(cls), l2_normalize(per_layer).reshape(batch, -1)],
                           axis=1)


@dataclasses.dataclass(frozen=True)
class VqtOptions(hooks_lib.Hooks):
  """VQT: ``num_queries`` query tokens per block, dropout, and how the head reads them."""
  num_queries: int
  dropout: float = 0.1
  combine: str = "concat"

  def query_tokens(self, batch_size, geometry, *, train):
    bound = prompt_init_bound(geometry.patch_size, geometry.width)
    return VqtQueries(self.num_queries, geometry.depth, geometry.width, bound, self.dropout,
                      name="vqt")(batch_size, train=train)

  def combine_queries(self, features, query_outputs):
    return VqtCombine(self.combine, name="vqt_head")(features, query_outputs)


class VqtQueries(nn.Module):
  """The query tokens (depth, T, D) -> (depth, B, T, D), dropped out per example."""
  num_queries: int
  depth: int
  width: int
  bound: float
  dropout_rate: float

  @nn.compact
  def __call__(self, batch_size: int, *, train: bool):
    queries = self.param("queries", uniform_symmetric(self.bound),
                         (self.depth, self.num_queries, self.width))
    return per_example_dropout(queries, batch_size, self.dropout_rate, train)


def _read_settings(config) -> base.Settings:
  section = config.vqt
  return dict(num_queries=int(section.num_queries), dropout=float(section.dropout),
              combine=str(section.combine))


def _check_settings(settings: base.Settings, spec, geometry) -> None:
  del spec, geometry
  if settings["num_queries"] < 1:
    base.fail(f"vqt.num_queries must be >= 1, got {settings['num_queries']}")
  if not 0 <= settings["dropout"] < 1:
    base.fail(f"vqt.dropout must lie in [0, 1), got {settings['dropout']}")
  if settings["combine"] not in COMBINES:
    base.fail(f"Unknown vqt.combine {settings['combine']!r}; choose one of {COMBINES}")


METHODS = (
    base.Method(
        "vqt", base.train_only(VQT_PARAMS), fresh=(VQT_PARAMS,),
        settings="vqt", read_settings=_read_settings, settings_check=_check_settings,
        make_hooks=lambda spec: VqtOptions(**spec["vqt"]),
        description="VQT: per-block query tokens whose outputs (not the blocks') join CLS "
                    "at the head"),
)
