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
q/k/v projections, final ``encoder_norm``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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
    "test": ViTSize(width=16, mlp_dim=32, num_heads=2, depth=2),
}
# The variants users name (the checkpoints that exist); any "<size>/<patch>" works.
NAMED_VARIANTS = ("Ti/16", "S/16", "B/16", "B/32", "L/16", "H/14")


def decode_variant(variant: str) -> tuple[ViTSize, int]:
  """Parses "B/16" into (ViTSize, patch_size); raises ValueError with choices."""
  size_name, sep, patch = variant.partition("/")
  if not sep or size_name not in VIT_SIZES or not patch.isdigit() or int(patch) < 1:
    import difflib  # pylint: disable=g-import-not-at-top
    close = difflib.get_close_matches(variant, NAMED_VARIANTS, n=3)
    raise ValueError(
        f"Unknown ViT variant {variant!r}. Use '<size>/<patch>' with size in "
        f"{sorted(VIT_SIZES)}, e.g. {', '.join(NAMED_VARIANTS)}"
        + (f"; did you mean {', '.join(close)}?" if close else "."))
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


class Attention(nn.Module):
  """Multi-head dot-product attention with separate q/k/v/out projections.

  Parameter names and shapes equal flax's MultiHeadDotProductAttention
  (query/key/value kernels (D, H, D/H), out kernel (H, D/H, D)), so the
  official checkpoints load; queries and keys/values may come from different
  token sets, which the prompt methods use.
  """
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv):
    """(B, Nq, D) queries attend over (B, Nk, D) keys/values -> (B, Nq, D)."""
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
    head_dim = width // self.num_heads
    projection = lambda name: nn.DenseGeneral(
        features=(self.num_heads, head_dim), dtype=self.dtype, name=name,
        kernel_init=nn.initializers.xavier_uniform())
    query = projection("query")(inputs_q)
    key = projection("key")(inputs_kv)
    value = projection("value")(inputs_kv)
    query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return nn.DenseGeneral(
        features=width, axis=(-2, -1), dtype=self.dtype, name="out",
        kernel_init=nn.initializers.xavier_uniform())(attended)


class Encoder1DBlock(nn.Module):
  """Pre-LN Transformer block.

  Two exact shortcuts avoid work whose result is thrown away:
  * ``kv_only``: tokens (B, P, D) that act only as keys and values (inserted
    after CLS, as VPT-deep prompts are) but whose own outputs are not needed,
    so they get no query, attention output, out-projection or MLP;
  * ``num_outputs``: only the first rows of ``x`` are computed (e.g. CLS in
    the last block of a CLS-pooled model); all rows still serve as keys.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, kv_only=None, num_outputs: Optional[int] = None,
               deterministic: bool = True):
    """x: (B, N, D) -> (B, N or num_outputs, D)."""
    pre_attention_norm = nn.LayerNorm(
        epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="LayerNorm_0")
    normed = pre_attention_norm(x)
    keys_values = normed
    if kv_only is not None:
      keys_values = jnp.concatenate(
          [normed[:, :1], pre_attention_norm(kv_only), normed[:, 1:]], axis=1)
    if num_outputs is not None:
      x, normed = x[:, :num_outputs], normed[:, :num_outputs]
    x = x + Attention(self.num_heads, dtype=self.dtype,
                      name="MultiHeadDotProductAttention_0")(normed, keys_values)
    normed = nn.LayerNorm(
        epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name="LayerNorm_1")(x)
    return x + MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype,
                        name="MlpBlock_0")(normed, deterministic=deterministic)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding (1, N, D) to (B, N, D) tokens."""

  @nn.compact
  def __call__(self, x):
    pos_embedding = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                               (1,) + x.shape[1:])
    return x + pos_embedding.astype(x.dtype)


def insert_after_cls(tokens, inserted):
  """[CLS, rest] + inserted -> [CLS, inserted, rest]. (B,1+N,D),(B,P,D)->(B,1+P+N,D)."""
  return jnp.concatenate([tokens[:, :1], inserted, tokens[:, 1:]], axis=1)


class Encoder(nn.Module):
  """Position embedding, prompt insertion, the blocks and the final norm.

  Returns the normalised tokens the pooling needs. With ``prompts`` of shape
  (S, B, P, D) (S = 1 for shallow, S = depth for deep), the output layout is
  [CLS, prompts, patches]; with ``pool == "original"`` and ``skip_dead_work``
  only CLS is computed in the last block, so the output is (B, 1, D).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  pool: str = "original"
  skip_dead_work: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, prompts=None, *, deterministic: bool = True):
    x = AddPositionEmbs(name="posembed_input")(x)
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
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dropout_rate,
                         dtype=self.dtype, name=f"encoderblock_{layer}")(
                             x, kv_only=kv_only, num_outputs=num_outputs,
                             deterministic=deterministic)
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


class VisionTransformer(nn.Module):
  """ViT classifier with optional VPT prompts.

  Attributes:
    num_classes: classifier outputs.
    variant: "<size>/<patch>", e.g. "B/16".
    dropout_rate: backbone dropout (embedding and MLP), active only when
      ``backbone_dropout`` and training (full fine-tuning, as the reference).
    num_prompts, deep_prompts, prompt_dropout, prompt_projection: VPT (0 = none).
    pool: "original" (CLS after encoder_norm) or an ablation pool.
    skip_dead_work: compute only what the head reads (exact rewrite).
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
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_features: bool = False):
    """images: (B, H, W, 3) normalised floats -> logits (B, num_classes)."""
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
      prompts = prompts_lib.VisualPrompts(
          num_prompts=self.num_prompts,
          num_sets=size.depth if self.deep_prompts else 1,
          width=size.width, patch_size=patch,
          projection=self.prompt_projection, dropout_rate=self.prompt_dropout,
          name="vpt")(batch, train=train)
      prompts = prompts.astype(tokens.dtype)

    encoded = Encoder(
        depth=size.depth, mlp_dim=size.mlp_dim, num_heads=size.num_heads,
        dropout_rate=self.dropout_rate, pool=self.pool,
        skip_dead_work=self.skip_dead_work, dtype=self.dtype, name="Transformer")(
            tokens, prompts, deterministic=not (train and self.backbone_dropout))
    features = pool_tokens(encoded, self.pool, self.num_prompts).astype(jnp.float32)
    if return_features:
      return features
    return heads_lib.LinearHead(self.num_classes, name="head")(features)
