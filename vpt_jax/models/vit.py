"""Vision Transformer backbone (Flax Linen) with visual prompts.

The module and parameter names reproduce the google-research/vision_transformer
checkpoint layout after flax's pre-Linen renumbering (``embedding``, ``cls``,
``Transformer/posembed_input/pos_embedding``, ``Transformer/encoderblock_{i}/
{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}``,
``Transformer/encoder_norm``), so a checkpoint maps onto the parameter tree by
name. Prompts live under ``vpt/`` and the classifier under ``head/``; neither is
ever read from a backbone file.

The math is that of the official ViT as used by the VPT reference (KMnP/vpt):
patch convolution, CLS token, learned position embedding added before any
prompt, pre-LN blocks with LayerNorm eps 1e-6, exact (erf) GELU, separate
q/k/v projections, final ``encoder_norm``. The MAE and MoCo v3 ViTs (variant
prefixes "mae-" and "moco-", see FLAVOURS) are the same blocks with their
checkpoints' sin-cos position embeddings; MAE pools through ``fc_norm``.

The other adaptation methods add parameters under names of their own, never
renaming a checkpoint parameter: ``cvpt/prompts`` (CVPT),
``e2vpt/kv_prompts`` (E2VPT), ``Transformer/encoderblock_{i}/adapter/...``
(Pfeiffer adapters), ``.../MultiHeadDotProductAttention_0/lora_{target}/...``
(LoRA), ``side/...`` (side-tuning) and ``head/hidden_{i}``,
``head/batchnorm_{i}`` (MLP-k heads). Each method's options are one frozen
dataclass attribute (``*_options``; None = method off).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.models import backbones
from vpt_jax.models import heads as heads_lib
from vpt_jax.models import prompts as prompts_lib

LAYER_NORM_EPSILON = 1e-6
POOL_TYPES = ("original", "prompt_pool", "img_pool", "imgprompt_pool")


@dataclasses.dataclass(frozen=True)
class ViTSize:
  """Width, MLP width, heads and depth of one ViT family member."""
  width: int
  mlp_dim: int
  num_heads: int
  depth: int


# The vision_transformer sizes, plus small members for tests and the quickstart.
VIT_SIZES = {
    "Ti": ViTSize(width=192, mlp_dim=768, num_heads=3, depth=12),
    "S": ViTSize(width=384, mlp_dim=1536, num_heads=6, depth=12),
    "B": ViTSize(width=768, mlp_dim=3072, num_heads=12, depth=12),
    "L": ViTSize(width=1024, mlp_dim=4096, num_heads=16, depth=24),
    "H": ViTSize(width=1280, mlp_dim=5120, num_heads=16, depth=32),
    "micro": ViTSize(width=96, mlp_dim=192, num_heads=3, depth=6),
    "nano": ViTSize(width=64, mlp_dim=128, num_heads=4, depth=4),  # the quickstart's
    "test": ViTSize(width=16, mlp_dim=32, num_heads=2, depth=2),
    "test4": ViTSize(width=16, mlp_dim=32, num_heads=2, depth=4),  # partial-k tests
}
# The variants users name (the checkpoints that exist); any "<size>/<patch>" works.
NAMED_VARIANTS = ("Ti/16", "S/16", "B/16", "B/32", "L/16", "H/14")


# Self-supervised flavours of the same architecture, selected by a variant
# prefix ("mae-B/16", "moco-B/16"; "" = the supervised ViT). What differs is
# the position embedding, the final norm and the pooling (vpt.md 1.8):
#   mae:  MAE's fixed 2-D sin-cos embedding as loaded from its checkpoint (a
#         parameter, trained only by `full`, like the reference's timm model);
#         no final norm; the features are fc_norm(mean of the non-CLS tokens),
#         prompts included, with a fresh LayerNorm ``fc_norm``.
#   moco: MoCo v3's fixed 2-D sin-cos embedding, never trained (it lives under
#         ``Transformer/posembed_fixed`` so the family can freeze it for every
#         method); CLS after the final norm, as the supervised ViT.
FLAVOURS = ("", "mae", "moco")
# Flavour -> the position embedding's module name and initialisation (see
# AddPositionEmbs.init_scheme).
FLAVOUR_POSEMB = {"": ("posembed_input", "learned"),
                  "mae": ("posembed_input", "sincos_columns_first"),
                  "moco": ("posembed_fixed", "sincos_rows_first")}
# The reference fine-tunes MAE with stochastic depth 0.1 (its `full` baseline,
# timm drop_path_rate); the supervised ViT and MoCo v3 use none.
FLAVOUR_DROP_PATH = {"": 0.0, "mae": 0.1, "moco": 0.0}


def _split_flavour(variant: str) -> tuple[str, str]:
  """"mae-B/16" -> ("mae", "B/16"); "B/16" -> ("", "B/16")."""
  prefix, sep, rest = variant.partition("-")
  if sep and prefix in FLAVOURS[1:]:
    return prefix, rest
  return "", variant


def variant_flavour(variant: str) -> str:
  """The flavour of a variant: "" (supervised), "mae" or "moco"."""
  decode_variant(variant)  # unknown variants fail here, with the choices
  return _split_flavour(variant)[0]


def decode_variant(variant: str) -> tuple[ViTSize, int]:
  """Parses "B/16" (or "mae-B/16", "moco-B/16") into (ViTSize, patch_size).

  The flavour prefix is ignored here (see ``variant_flavour``); unknown
  variants raise ValueError with the choices.
  """
  _, rest = _split_flavour(variant)
  size_name, sep, patch = rest.partition("/")
  if not sep or size_name not in VIT_SIZES or not patch.isdigit() or int(patch) < 1:
    raise ValueError(
        f"Unknown ViT variant {variant!r} (other families: swin-, convnext-, resnet-). "
        f"Use '<size>/<patch>' with size in "
        f"{sorted(VIT_SIZES)}, e.g. {', '.join(NAMED_VARIANTS)}, optionally prefixed "
        f"by a self-supervised flavour ({', '.join(f + '-' for f in FLAVOURS[1:])}, "
        "e.g. mae-B/16)"
        + (backbones.did_you_mean(variant, sorted(set(NAMED_VARIANTS + backbones.PAPER_VARIANTS)),
                                  cutoff=0.5) or "."))
  return VIT_SIZES[size_name], int(patch)


class MlpBlock(nn.Module):
  """Dense -> exact GELU -> dropout -> Dense -> dropout. (B, N, D) -> (B, N, D)."""
  mlp_dim: int
  dropout_rate: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    width = x.shape[-1]
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, name=name,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    y = dense(self.mlp_dim, "Dense_0")(x)
    y = nn.gelu(y, approximate=False)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(width, "Dense_1")(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


LORA_TARGETS = ("query", "key", "value", "out")
ADAPTER_INITS = ("default", "vpt_reference")
CVPT_INSERTS = (1, 2, 3, 4, 5)


@dataclasses.dataclass(frozen=True)
class LoraOptions:
  """LoRA on the attention projections named in ``targets`` (subset of LORA_TARGETS)."""
  rank: int = 8
  alpha: float = 8.0
  targets: tuple[str, ...] = ("query", "value")


@dataclasses.dataclass(frozen=True)
class AdapterOptions:
  """Pfeiffer adapters of bottleneck width D // reduction; init in ADAPTER_INITS."""
  reduction: int = 8
  init: str = "default"


@dataclasses.dataclass(frozen=True)
class CvptOptions:
  """CVPT: m prompts per block, cross-attention at ``insert``, prompt dropout, drop path."""
  num_prompts: int = 10
  insert: int = 3
  dropout: float = 0.1
  drop_path: float = 0.1


@dataclasses.dataclass(frozen=True)
class E2vptOptions:
  """E2VPT's key-value prompts per block (the visual prompts are VPT-deep's)."""
  num_prompts: int = 5
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class VfptOptions:
  """VFPT: the fraction of each prompt set that is Fourier-transformed, and how."""
  percentage: float = 0.5
  dimension: str = "all"


@dataclasses.dataclass(frozen=True)
class SideOptions:
  """Side-tuning: the channel widths of the side CNN's stride-2 3x3 convolutions."""
  widths: tuple[int, ...] = (32, 64, 128)


class LoRA(nn.Module):
  """Low-rank update of a frozen projection (Hu et al., "LoRA", ICLR 2022).

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
    a = self.param("a", prompts_lib.uniform_symmetric(1.0 / math.sqrt(fan_in)),
                   in_shape + (self.rank,))
    b = self.param("b", nn.initializers.zeros, (self.rank,) + tuple(self.out_features))
    low = jnp.tensordot(x, a.astype(self.dtype), axes=self.num_in_axes)
    return jnp.tensordot(low, b.astype(self.dtype), axes=1) * (self.alpha / self.rank)


class Attention(nn.Module):
  """Multi-head dot-product attention with separate q/k/v/out projections.

  Parameter names and shapes equal flax's MultiHeadDotProductAttention
  (query/key/value kernels (D, H, D/H), out kernel (H, D/H, D)), so the
  official checkpoints load; queries and keys/values may come from different
  token sets, which the prompt methods use (CVPT calls the same instance, and
  hence the same parameters, for its cross-attention).

  With ``lora`` each targeted projection P becomes P(x) + LoRA_P(x)
  (parameters ``lora_{target}/{a,b}``). ``kv_prompts`` (B, N_kv, H, D/H) are
  E2VPT's key-value prompts: prepended to the already projected keys and to
  the values, K' = [P_kv; K], V' = [P_kv; V]; the queries are unchanged.
  """
  num_heads: int
  lora: Optional[LoraOptions] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, kv_prompts=None):
    """(B, Nq, D) queries attend over (B, Nk, D) keys/values -> (B, Nq, D)."""
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
    head_dim = width // self.num_heads

    def project(name, inputs, features, axis=-1):
      outputs = nn.DenseGeneral(features=features, axis=axis, dtype=self.dtype, name=name,
                                kernel_init=nn.initializers.xavier_uniform())(inputs)
      if self.lora is not None and name in self.lora.targets:
        out_features = tuple(features) if isinstance(features, tuple) else (features,)
        num_in_axes = len(axis) if isinstance(axis, tuple) else 1
        outputs = outputs + LoRA(self.lora.rank, self.lora.alpha, out_features, num_in_axes,
                                 dtype=self.dtype, name=f"lora_{name}")(inputs)
      return outputs

    heads = (self.num_heads, head_dim)
    query = project("query", inputs_q, heads)
    key = project("key", inputs_kv, heads)
    value = project("value", inputs_kv, heads)
    if kv_prompts is not None:
      kv_prompts = kv_prompts.astype(key.dtype)
      key = jnp.concatenate([kv_prompts, key], axis=1)
      value = jnp.concatenate([kv_prompts, value], axis=1)
    query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return project("out", attended, width, axis=(-2, -1))


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
      raise ValueError(f"Unknown adapter init {self.init_scheme!r}; choose one of "
                       f"{ADAPTER_INITS}")
    bottleneck = width // self.reduction if self.reduction >= 1 else 0
    if bottleneck < 1:
      raise ValueError(f"adapter reduction {self.reduction} leaves no bottleneck for width "
                       f"{width}; use a reduction between 1 and {width}")
    down_init = (nn.initializers.zeros if self.init_scheme == "vpt_reference"
                 else nn.initializers.xavier_uniform())
    h = nn.Dense(bottleneck, dtype=self.dtype, name="down", kernel_init=down_init,
                 bias_init=nn.initializers.zeros)(y)
    h = nn.gelu(h, approximate=False)
    return nn.Dense(width, dtype=self.dtype, name="up", kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros)(h)


class Encoder1DBlock(nn.Module):
  """Pre-LN Transformer block, optionally with a method's additions.

  Two exact shortcuts avoid work whose result is thrown away:
  * ``kv_only``: tokens (B, P, D) that act only as keys and values (inserted
    after CLS, as VPT-deep prompts are) but whose own outputs are not needed,
    so they get no query, attention output, out-projection or MLP;
  * ``num_outputs``: only the first rows of ``x`` are computed (e.g. CLS in
    the last block of a CLS-pooled model); all rows still serve as keys.

  CVPT (``cross_prompts`` (B, m, D)): CA(x) = Attention(q_in=x, kv_in=P), the
  block's own attention module called a second time, so it reads exactly the
  block's query/key/value/out parameters (cvpt.md 1.3-1.4); no LayerNorm on x
  or P, no drop path on this branch. At ``cross_insert`` (cvpt.md 1.2):
    1: x += CA(x); then x += DP(SA(LN0 x)); x += DP(MLP(LN1 x))
    2: x += DP(SA(LN0 x) + CA(x)); x += DP(MLP(LN1 x))
    3: x += DP(SA(LN0 x)); x += CA(x); x += DP(MLP(LN1 x))    (the reference default)
    4: x += DP(SA(LN0 x)); x += DP(MLP(LN1(x) + CA(x)))
    5: x += DP(SA(LN0 x)); x += DP(MLP(LN1 x)); x += CA(x)
  CA treats every query row independently (its softmax runs over the prompts
  only), so the ``num_outputs`` shortcut stays exact.

  DP is drop path (stochastic depth) at ``drop_path_rate``: per example, the
  branch is zeroed with that probability and otherwise scaled by 1 / (1 - rate).

  Adapter (``adapter``): the MLP branch becomes y + Adapter(y), y = MLP(LN1 x).
  LoRA (``lora``) and E2VPT (``kv_prompts`` (B, N_kv, H, D/H)): see Attention.

  Every argument may also be passed positionally: ``nn.remat`` holds only
  positional arguments static (``BLOCK_STATIC_ARGNUMS``), so ``Encoder`` calls
  each block that way.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  drop_path_rate: float = 0.0
  cross_insert: int = 3
  adapter: Optional[AdapterOptions] = None
  lora: Optional[LoraOptions] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, kv_only=None, num_outputs: Optional[int] = None,
               deterministic: bool = True, cross_prompts=None, kv_prompts=None,
               drop_path_deterministic: bool = True):
    """x: (B, N, D) -> (B, N or num_outputs, D)."""
    attention = Attention(self.num_heads, lora=self.lora, dtype=self.dtype,
                          name="MultiHeadDotProductAttention_0")
    insert = self.cross_insert if cross_prompts is not None else None

    def cross(queries):
      return attention(queries, cross_prompts)

    def drop_path(branch):
      # Broadcast over tokens and channels: one keep/drop decision per example.
      return nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))(
          branch, deterministic=drop_path_deterministic)

    if insert == 1:
      x = x + cross(x)
    pre_attention_norm = nn.LayerNorm(
        epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="LayerNorm_0")
    normed = pre_attention_norm(x)
    keys_values = normed
    if kv_only is not None:
      keys_values = jnp.concatenate(
          [normed[:, :1], pre_attention_norm(kv_only), normed[:, 1:]], axis=1)
    if num_outputs is not None:
      x, normed = x[:, :num_outputs], normed[:, :num_outputs]
    branch = attention(normed, keys_values, kv_prompts)
    if insert == 2:
      branch = branch + cross(x)
    x = x + drop_path(branch)
    if insert == 3:
      x = x + cross(x)
    normed = nn.LayerNorm(
        epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="LayerNorm_1")(x)
    if insert == 4:
      normed = normed + cross(x)
    branch = MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype,
                      name="MlpBlock_0")(normed, deterministic=deterministic)
    if self.adapter is not None:
      branch = branch + Adapter(self.adapter.reduction, self.adapter.init, dtype=self.dtype,
                                name="adapter")(branch)
    x = x + drop_path(branch)
    if insert == 5:
      x = x + cross(x)
    return x


def sincos_posemb(grid_side: int, width: int, rows_first: bool) -> np.ndarray:
  """2-D sin-cos position embedding of a square grid, with a zero CLS row.

  Token t = r * grid_side + c (row-major patches) gets
  [sin(a w), cos(a w), sin(b w), cos(b w)] with w_k = 10000^(-k / (width/4)),
  k < width / 4, where (a, b) = (r, c) if ``rows_first`` (MoCo v3's layout:
  its meshgrid puts the row first) and (c, r) otherwise (MAE's layout).

  Returns:
    float32 (1, 1 + grid_side^2, width); row 0 (CLS) is zero.
  """
  if width % 4:
    raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, "
                     f"got {width}")
  omega = 1.0 / 10000.0 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  rows, cols = np.divmod(np.arange(grid_side * grid_side, dtype=np.float64), grid_side)
  first, second = (rows, cols) if rows_first else (cols, rows)
  angles_a, angles_b = np.outer(first, omega), np.outer(second, omega)
  grid = np.concatenate([np.sin(angles_a), np.cos(angles_a), np.sin(angles_b),
                         np.cos(angles_b)], axis=1)
  return np.concatenate([np.zeros((1, width)), grid])[None].astype(np.float32)


POSEMB_INITS = ("learned", "sincos_rows_first", "sincos_columns_first")


class AddPositionEmbs(nn.Module):
  """Adds a position embedding parameter (1, N, D) to (B, N, D) tokens.

  ``init_scheme``: "learned" draws N(0, 0.02); the sin-cos schemes start from
  ``sincos_posemb`` (N = 1 + a square grid; row 0 is CLS's).
  """
  init_scheme: str = "learned"

  @nn.compact
  def __call__(self, x):
    if self.init_scheme == "learned":
      init = nn.initializers.normal(stddev=0.02)
    elif self.init_scheme in POSEMB_INITS:
      grid_side = math.isqrt(x.shape[1] - 1)
      if grid_side * grid_side != x.shape[1] - 1:
        raise ValueError(f"a sin-cos position embedding needs a square patch grid, got "
                         f"{x.shape[1] - 1} patches")
      table = sincos_posemb(grid_side, x.shape[2], self.init_scheme == "sincos_rows_first")
      init = lambda key, shape: jnp.asarray(table)
    else:
      raise ValueError(f"Unknown position embedding init {self.init_scheme!r}; choose one "
                       f"of {POSEMB_INITS}")
    pos_embedding = self.param("pos_embedding", init, (1,) + x.shape[1:])
    return x + pos_embedding.astype(x.dtype)


def insert_after_cls(tokens, inserted):
  """[CLS, rest] + inserted -> [CLS, inserted, rest]. (B,1+N,D),(B,P,D)->(B,1+P+N,D)."""
  return jnp.concatenate([tokens[:, :1], inserted, tokens[:, 1:]], axis=1)


# Rematerialisation of the encoder blocks: "none" keeps every activation the
# backward pass reads; "block" keeps only each block's input and recomputes the
# block's inside during the backward pass (less memory, about one more forward).
REMAT_MODES = ("none", "block")
# Encoder1DBlock.__call__'s Python-valued arguments (num_outputs, deterministic,
# drop_path_deterministic), counted with self as 0: nn.remat traces every other
# argument, and these decide shapes and control flow.
BLOCK_STATIC_ARGNUMS = (3, 4, 7)


class Encoder(nn.Module):
  """Position embedding, prompt insertion, the blocks and the final norm.

  Returns the normalised tokens the pooling needs. With ``prompts`` of shape
  (S, B, P, D) (S = 1 for shallow, S = depth for deep), the output layout is
  [CLS, prompts, patches]; with ``pool == "original"`` and ``skip_dead_work``
  only CLS is computed in the last block, so the output is (B, 1, D).

  ``cross_prompts`` (depth, B, m, D) are CVPT's (block l reads slice l, outside
  the sequence), ``kv_prompts`` (depth, B, N_kv, H, D/H) E2VPT's. Block l's drop
  path rate is ``stochastic_depth * l / (depth - 1)`` (timm's linear ramp),
  active when ``drop_path_deterministic`` is False.

  ``remat`` (one of REMAT_MODES): with "block" every block is wrapped in
  ``nn.remat``; the parameters, outputs and gradients are unchanged.

  ``flavour`` (FLAVOURS) picks the position embedding (FLAVOUR_POSEMB); "mae"
  returns the last block's tokens without the final norm. The caller passes
  the pool the head really reads (MAE's mean is "imgprompt_pool"), so that
  ``skip_dead_work`` keeps every token it averages.
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  pool: str = "original"
  skip_dead_work: bool = True
  stochastic_depth: float = 0.0
  cross_insert: int = 3
  adapter: Optional[AdapterOptions] = None
  lora: Optional[LoraOptions] = None
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  flavour: str = ""

  @nn.compact
  def __call__(self, x, prompts=None, *, deterministic: bool = True, cross_prompts=None,
               kv_prompts=None, drop_path_deterministic: bool = True):
    if self.remat not in REMAT_MODES:
      raise ValueError(f"Unknown remat {self.remat!r}; choose one of {REMAT_MODES}")
    block_class = (nn.remat(Encoder1DBlock, static_argnums=BLOCK_STATIC_ARGNUMS)
                   if self.remat == "block" else Encoder1DBlock)
    posemb_name, posemb_init = FLAVOUR_POSEMB[self.flavour]
    x = AddPositionEmbs(posemb_init, name=posemb_name)(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    num_prompts = 0 if prompts is None else prompts.shape[2]
    deep = num_prompts > 0 and prompts.shape[0] > 1
    if deep and prompts.shape[0] != self.depth:
      raise ValueError(f"deep prompts need {self.depth} sets, got {prompts.shape[0]}")
    # Pools other than CLS index the output as [CLS, prompts, patches].
    prompt_outputs_needed = self.pool != "original"
    # Prompts travel in the sequence unless every block discards their outputs.
    in_sequence = num_prompts > 0 and not (deep and self.skip_dead_work)
    if in_sequence:
      x = insert_after_cls(x, prompts[0])
    for layer in range(self.depth):
      last = layer == self.depth - 1
      kv_only = None
      if deep and layer > 0 and in_sequence:
        # The previous block's prompt outputs are replaced by this block's prompts.
        x = jnp.concatenate([x[:, :1], prompts[layer], x[:, 1 + num_prompts:]], axis=1)
      elif deep and not in_sequence:
        if last and prompt_outputs_needed:
          x = insert_after_cls(x, prompts[layer])
          in_sequence = True
        else:
          kv_only = prompts[layer]
      num_outputs = 1 if (last and self.skip_dead_work and self.pool == "original") else None
      # Positional: nn.remat's static arguments (BLOCK_STATIC_ARGNUMS) must be.
      x = block_class(
          self.mlp_dim, self.num_heads, self.dropout_rate,
          drop_path_rate=self.stochastic_depth * layer / max(self.depth - 1, 1),
          cross_insert=self.cross_insert, adapter=self.adapter, lora=self.lora,
          dtype=self.dtype, name=f"encoderblock_{layer}")(
              x, kv_only, num_outputs, deterministic,
              None if cross_prompts is None else cross_prompts[layer],
              None if kv_prompts is None else kv_prompts[layer],
              drop_path_deterministic)
    if self.flavour == "mae":  # MAE's pooled features get fc_norm instead
      return x
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype,
                        name="encoder_norm")(x)


def pool_tokens(tokens, pool: str, num_prompts: int):
  """Pools encoder output (B, T, D) laid out as [CLS, prompts, patches] -> (B, D)."""
  if pool == "original":
    return tokens[:, 0]
  if pool == "prompt_pool":
    if not num_prompts:
      raise ValueError("pool='prompt_pool' needs num_prompts >= 1")
    return tokens[:, 1:1 + num_prompts].mean(axis=1)
  if pool == "img_pool":
    return tokens[:, 1 + num_prompts:].mean(axis=1)
  if pool == "imgprompt_pool":
    return tokens[:, 1:].mean(axis=1)
  raise ValueError(f"Unknown pool {pool!r}; choose one of {POOL_TYPES}")


class SideNetwork(nn.Module):
  """Side-tuning (Zhang et al., ECCV 2020) as the VPT reference's baseline (vpt.md 1.10).

  out = sigmoid(alpha) * backbone_features + (1 - sigmoid(alpha)) * side(images),
  alpha a learned scalar initialised to 0 (an even blend). side(x) is a small
  CNN (stride-2 3x3 convolutions ``conv_{i}`` with ReLU, then a global average
  pool) followed by a bias-free Dense(D) ``projection``. The reference's side
  network is torchvision's ImageNet AlexNet ``features`` + 6x6 pooling (9216 ->
  D projection); here the CNN is small and can start from its own ``.npz``
  (``factory.load_side_network``), with the same gate, projection and bias.
  """
  widths: Sequence[int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, backbone_features):
    """images (B, H, W, 3), backbone_features (B, D) -> blended features (B, D)."""
    x = images
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype,
                          name=f"conv_{i}")(x))
    side = nn.Dense(backbone_features.shape[-1], use_bias=False, dtype=self.dtype,
                    name="projection")(x.mean(axis=(1, 2)))
    gate = jax.nn.sigmoid(self.param("alpha", nn.initializers.zeros, ()))
    return gate * backbone_features + (1 - gate) * side.astype(backbone_features.dtype)


class VisionTransformer(nn.Module):
  """ViT classifier with optional VPT prompts and the other methods' additions.

  Attributes:
    num_classes: classifier outputs.
    variant: "<size>/<patch>", e.g. "B/16", optionally with a flavour prefix
      ("mae-B/16", "moco-B/16"; see FLAVOURS).
    dropout_rate: backbone dropout (embedding and MLP), active only when
      ``backbone_dropout`` and training (full fine-tuning, as the reference).
    num_prompts, deep_prompts, prompt_dropout, prompt_projection: VPT (0 = none).
    pool: "original" (CLS after encoder_norm; for MAE fc_norm of the mean of
      all non-CLS tokens) or an ablation pool (for MAE followed by fc_norm).
    skip_dead_work: compute only what the head reads (exact rewrite).
    head_hidden_layers, head_dropout, head_init: the head (``heads.Head``);
      hidden layers > 0 make the reference's MLP-k head (with BatchNorm).
    cvpt_options, e2vpt_options, vfpt_options, adapter_options, lora_options,
      side_options: the methods' additions (None = off); see the option
      dataclasses and the modules above.
    dtype: the backbone's compute dtype. With bfloat16 the patch embedding,
      the blocks (matmuls, activations, residual stream) and the final norm run
      in bfloat16, while every parameter is stored in float32 and cast at use,
      LayerNorm statistics and the attention softmax are float32, prompts are
      made in float32 and cast as they enter the sequence, and the pooled
      features, the head and its logits are float32 (so are the loss, the
      gradients and the optimizer state, which follow the parameters).
    remat: "none" or "block" (``REMAT_MODES``): recompute each block's
      activations in the backward pass instead of keeping them.
  """
  num_classes: int
  variant: str = "B/16"
  dropout_rate: float = 0.1
  backbone_dropout: bool = False
  num_prompts: int = 0
  deep_prompts: bool = False
  prompt_dropout: float = 0.0
  prompt_projection: int = -1
  pool: str = "original"
  skip_dead_work: bool = True
  head_hidden_layers: int = 0
  head_dropout: float = 0.1
  head_init: str = "vpt"
  cvpt_options: Optional[CvptOptions] = None
  e2vpt_options: Optional[E2vptOptions] = None
  vfpt_options: Optional[VfptOptions] = None
  adapter_options: Optional[AdapterOptions] = None
  lora_options: Optional[LoraOptions] = None
  side_options: Optional[SideOptions] = None
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_features: bool = False,
               from_features: bool = False):
    """images: (B, H, W, 3) normalised floats -> logits (B, num_classes).

    ``return_features``: return the pooled features (B, D) the head reads.
    ``from_features``: ``images`` are such features (B, D); only the head runs
    (how head-only methods train on cached features).
    """
    head = heads_lib.backbone_head(self)
    if from_features:
      if self.side_options is not None:
        raise ValueError("side-tuning reads the images, so it cannot run from cached "
                         "features; call the model on images")
      return head(images, train=train)
    size, patch = decode_variant(self.variant)
    if images.shape[1] % patch or images.shape[2] % patch:
      raise ValueError(f"image size {images.shape[1:3]} is not divisible by the patch "
                       f"size {patch}; resize to a multiple of {patch}")
    tokens = nn.Conv(size.width, (patch, patch), strides=(patch, patch),
                     padding="VALID", dtype=self.dtype, name="embedding")(images)
    batch, height, width, channels = tokens.shape
    tokens = tokens.reshape(batch, height * width, channels)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, channels))
    tokens = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(tokens.dtype), (batch, 1, channels)), tokens], axis=1)

    prompts = None
    if self.num_prompts:
      num_fourier = 0
      if self.vfpt_options is not None:
        num_fourier = int(math.floor(self.num_prompts * self.vfpt_options.percentage))
      prompts = prompts_lib.VisualPrompts(
          num_prompts=self.num_prompts,
          num_sets=size.depth if self.deep_prompts else 1,
          width=size.width, patch_size=patch,
          projection=self.prompt_projection, dropout_rate=self.prompt_dropout,
          num_fourier=num_fourier,
          fourier_dimension=getattr(self.vfpt_options, "dimension", "all"),
          name="vpt")(batch, train=train)
      prompts = prompts.astype(tokens.dtype)
    cross_prompts = kv_prompts = None
    if self.cvpt_options is not None:
      cross_prompts = prompts_lib.CrossPrompts(
          self.cvpt_options.num_prompts, size.depth, size.width,
          dropout_rate=self.cvpt_options.dropout, name="cvpt")(batch, train=train)
      cross_prompts = cross_prompts.astype(tokens.dtype)
    if self.e2vpt_options is not None:
      kv_prompts = prompts_lib.KeyValuePrompts(
          self.e2vpt_options.num_prompts, size.depth, size.num_heads,
          size.width // size.num_heads, dropout_rate=self.e2vpt_options.dropout,
          name="e2vpt")(batch, train=train)

    flavour = variant_flavour(self.variant)
    # MAE's "original" representation is the mean of every non-CLS token,
    # prompts included (the reference's global pool), i.e. imgprompt_pool.
    pool = "imgprompt_pool" if flavour == "mae" and self.pool == "original" else self.pool
    if self.cvpt_options is not None:  # CVPT's stochastic depth, whenever training
      drop_path, drop_path_deterministic = self.cvpt_options.drop_path, not train
    else:  # the flavour's, only when the backbone trains in train mode (full)
      drop_path = FLAVOUR_DROP_PATH[flavour]
      drop_path_deterministic = not (train and self.backbone_dropout)
    encoded = Encoder(
        depth=size.depth, mlp_dim=size.mlp_dim, num_heads=size.num_heads,
        dropout_rate=self.dropout_rate, pool=pool,
        skip_dead_work=self.skip_dead_work,
        stochastic_depth=drop_path,
        cross_insert=getattr(self.cvpt_options, "insert", 3),
        adapter=self.adapter_options, lora=self.lora_options,
        dtype=self.dtype, remat=self.remat, flavour=flavour, name="Transformer")(
            tokens, prompts, deterministic=not (train and self.backbone_dropout),
            cross_prompts=cross_prompts, kv_prompts=kv_prompts,
            drop_path_deterministic=drop_path_deterministic)
    features = pool_tokens(encoded, pool, self.num_prompts)
    if flavour == "mae":  # a fresh LayerNorm; MAE's checkpoint has none
      features = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype,
                              name="fc_norm")(features)
    features = features.astype(jnp.float32)
    if self.side_options is not None:
      features = SideNetwork(self.side_options.widths, dtype=self.dtype, name="side")(
          images, features).astype(jnp.float32)
    if return_features:
      return features
    return head(features, train=train)
