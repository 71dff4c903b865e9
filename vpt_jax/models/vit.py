"""Vision Transformer backbone (Flax Linen) with hook points for adaptation methods.

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
prefixes "mae-" and "moco-", see ``vit_variants``) are the same blocks with their
checkpoints' sin-cos position embeddings; MAE pools through ``fc_norm``.

Adaptation methods add themselves through one ``hooks.Hooks`` object
(``VisionTransformer.hooks``) under parameter names of their own, never
renaming a checkpoint parameter (see ``vpt_jax.methods``); the architecture
never imports a method.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt_jax import errors
from vpt_jax.models import heads as heads_lib
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models import lean_ops
from vpt_jax.models import map_head
from vpt_jax.models import posemb_interpolation
from vpt_jax.models import position_embeddings
from vpt_jax.models import prompt_schedule
from vpt_jax.models import vit_blocks
from vpt_jax.models import vit_options
from vpt_jax.models import vit_variants

POOL_TYPES = ("original", "prompt_pool", "img_pool", "imgprompt_pool")


def insert_after_cls(tokens, inserted, prefix: int = 1):
  """[CLS, rest] + inserted -> [CLS, inserted, rest]. (B,1+N,D),(B,P,D)->(B,1+P+N,D).

  ``prefix``: how many leading tokens stay in front (CLS and registers; 0 without CLS).
  """
  return jnp.concatenate([tokens[:, :prefix], inserted, tokens[:, prefix:]], axis=1)


# Rematerialisation of the encoder blocks: "none" keeps every activation the
# backward pass reads; "block" keeps only each block's input and recomputes the
# block's inside during the backward pass (less memory, about one more forward).
REMAT_MODES = ("none", "block")
# Encoder1DBlock.__call__'s Python-valued arguments (num_outputs, deterministic,
# drop_path_deterministic), counted with self as 0: nn.remat traces every other
# argument, and these decide shapes and control flow.
BLOCK_STATIC_ARGNUMS = (3, 4, 6)


class Encoder(nn.Module):
  """Position embedding, prompt insertion, the blocks and the final norm.

  Returns the normalised tokens the pooling needs. With ``prompts`` of shape
  (S, B, P, D) (S = 1 for shallow, S = depth for deep; ``hooks.prompt_plan``
  says where each set enters, see ``prompt_schedule``), the output layout is
  [CLS, prompts, patches]; with ``pool == "original"`` and ``skip_dead_work``
  only CLS is computed in the last block, so the output is (B, 1, D).

  ``method_inputs`` (``Hooks.block_inputs``: arrays with a leading depth
  axis) reach block l as their slice l. Block l's drop path rate is
  ``stochastic_depth * l / (depth - 1)`` (timm's linear ramp),
  active when ``drop_path_deterministic`` is False.

  ``queries`` (depth, B, T, D) (``Hooks.query_tokens``, VQT): block l also
  runs queries[l] as query-only rows; the output is then (tokens, query
  outputs (depth, B, T, D), taken before any final norm).

  ``remat`` (one of REMAT_MODES): with "block" every block is wrapped in
  ``nn.remat``; the parameters, outputs and gradients are unchanged.

  ``flavour`` (``vit_variants.FLAVOURS``) picks the position embedding
  (``vit_variants.FLAVOUR_POSEMB``); "mae"
  returns the last block's tokens without the final norm. The caller passes
  the pool the head really reads (MAE's mean is "imgprompt_pool"), so that
  ``skip_dead_work`` keeps every token it averages.

  ``options`` (``vit_options.TowerOptions``): DINOv2's interpolated position
  embedding and registers (inserted after CLS, after the position embedding),
  CLIP's ``ln_pre``; the prompts follow CLS and the registers (``prefix_tokens``).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.1
  pool: str = "original"
  skip_dead_work: bool = True
  stochastic_depth: float = 0.0
  hooks: hooks_lib.Hooks = hooks_lib.NO_HOOKS
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  flavour: str = ""
  options: vit_options.TowerOptions = vit_options.PLAIN
  attention_kernel: str = "einsum"  # attention_kernels.ATTENTION_KERNELS

  @nn.compact
  def __call__(self, x, prompts=None, *, deterministic: bool = True, method_inputs=None,
               drop_path_deterministic: bool = True, queries=None):
    if self.remat not in REMAT_MODES:
      raise ValueError(f"Unknown remat {self.remat!r}; choose one of {REMAT_MODES}")
    block_class = (nn.remat(vit_blocks.Encoder1DBlock, static_argnums=BLOCK_STATIC_ARGNUMS)
                   if self.remat == "block" else vit_blocks.Encoder1DBlock)
    options, prefix = self.options, self.options.prefix_tokens
    x = self._embed_positions(x)
    x = lean_ops.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    num_prompts = 0 if prompts is None else prompts.shape[2]
    steps = prompt_schedule.schedule(
        self.hooks.prompt_plan(self.depth), 0 if prompts is None else prompts.shape[0], self.depth,
        # Pools other than CLS index the output as [CLS, prompts, patches].
        outputs_read=self.pool != "original", skip_dead_work=self.skip_dead_work)
    query_outputs = []
    for layer in range(self.depth):
      last = layer == self.depth - 1
      x, kv_only = prompt_schedule.apply(x, steps[layer], prompts, num_prompts, prefix)
      num_outputs = 1 if (last and self.skip_dead_work and self.pool == "original") else None
      # Positional: nn.remat's static arguments (BLOCK_STATIC_ARGNUMS) must be.
      x = block_class(
          self.mlp_dim, self.num_heads, self.dropout_rate,
          drop_path_rate=self.stochastic_depth * layer / max(self.depth - 1, 1),
          hooks=self.hooks, dtype=self.dtype, options=options,
          attention_kernel=self.attention_kernel, name=f"encoderblock_{layer}")(
              x, kv_only, num_outputs, deterministic,
              jax.tree.map(lambda inputs: inputs[layer], method_inputs),
              drop_path_deterministic, None if queries is None else queries[layer])
      if queries is not None:  # query outputs leave; they never enter the next block
        query_outputs.append(x[:, :queries.shape[2]])
        x = x[:, queries.shape[2]:]
    if self.flavour != "mae":  # MAE's pooled features get fc_norm instead
      x = self.hooks.norm_output("encoder_norm", lean_ops.LayerNorm(
          epsilon=options.layer_norm_epsilon, dtype=self.dtype, name="encoder_norm")(x))
    return x if queries is None else (x, jnp.stack(query_outputs))

  def _embed_positions(self, x):
    """Position embedding, then (options) ln_pre and the registers after CLS."""
    options = self.options
    posemb_name, posemb_init = vit_variants.FLAVOUR_POSEMB[self.flavour]
    if options.posemb_grid:
      x = posemb_interpolation.InterpolatedPositionEmbs(
          options.posemb_grid, options.interpolate_offset, options.interpolate_antialias,
          name=posemb_name)(x)
    else:
      x = position_embeddings.AddPositionEmbs(posemb_init, name=posemb_name)(x)
    if options.ln_pre:
      x = lean_ops.LayerNorm(epsilon=options.layer_norm_epsilon, dtype=self.dtype, name="ln_pre")(x)
    if options.registers:
      registers = self.param("registers", nn.initializers.normal(1e-6),
                             (1, options.registers, x.shape[-1]))
      x = insert_after_cls(x, jnp.broadcast_to(registers.astype(x.dtype),
                                               (x.shape[0],) + registers.shape[1:]))
    return x


def with_cls(patches, cls):
  """Patch tokens (B, h, w, D) and CLS (1, 1, D) -> [CLS, patches] (B, 1 + h w, D)."""
  batch, height, width, channels = patches.shape
  cls = jnp.broadcast_to(cls.astype(patches.dtype), (batch, 1, channels))
  return jnp.concatenate([cls, patches.reshape(batch, height * width, channels)], axis=1)


def pool_tokens(tokens, pool: str, num_prompts: int):
  """Pools encoder output (B, T, D) laid out as [CLS, prompts, patches] -> (B, D)."""
  if pool == "original":
    return tokens[:, 0]
  if pool == "prompt_pool":
    if not num_prompts:
      raise errors.UserError("pool='prompt_pool' needs num_prompts >= 1")
    return tokens[:, 1:1 + num_prompts].mean(axis=1)
  if pool == "img_pool":
    return tokens[:, 1 + num_prompts:].mean(axis=1)
  if pool == "imgprompt_pool":
    return tokens[:, 1:].mean(axis=1)
  raise errors.UserError(f"Unknown pool {pool!r}; choose one of {POOL_TYPES}")


class VisionTransformer(nn.Module):
  """ViT classifier; an adaptation method adds itself through ``hooks``.

  Attributes:
    num_classes: classifier outputs.
    variant: "<size>/<patch>", e.g. "B/16", optionally with a flavour prefix
      ("mae-B/16", "moco-B/16"; see ``vit_variants.FLAVOURS``).
    dropout_rate: backbone dropout (embedding and MLP), active only when
      ``backbone_dropout`` and training (full fine-tuning, as the reference).
    pool: "original" (CLS after encoder_norm; for MAE fc_norm of the mean of
      all non-CLS tokens) or an ablation pool (for MAE followed by fc_norm).
    skip_dead_work: compute only what the head reads (exact rewrite).
    head_hidden_layers, head_dropout, head_init: the head (``heads.Head``);
      hidden layers > 0 make the reference's MLP-k head (with BatchNorm).
    hooks: the method's additions (``hooks.Hooks``; NO_HOOKS = none): prompts,
      per-block inputs, block hooks, pooled-feature hook.
    dtype: the backbone's compute dtype. With bfloat16 the patch embedding,
      the blocks (matmuls, activations, residual stream) and the final norm run
      in bfloat16, while every parameter is stored in float32 and cast at use,
      LayerNorm statistics and the attention softmax are float32, prompts are
      made in float32 and cast as they enter the sequence, and the pooled
      features, the head and its logits are float32 (so are the loss, the
      gradients and the optimizer state, which follow the parameters).
    remat: "none" or "block" (``REMAT_MODES``): recompute each block's
      activations in the backward pass instead of keeping them.
    options: the tower's architecture (``vit_options.TowerOptions``; default
      the plain ViT): no CLS and MAP pooling (SigLIP; prompts then come first,
      before the patches), CLIP's bias-free patch convolution and ``projection``
      of the pooled features, and the block and encoder options.
    attention_kernel: "einsum" or "dot_product" (``attention_kernels``).
  """
  num_classes: int
  variant: str = "B/16"
  dropout_rate: float = 0.1
  backbone_dropout: bool = False
  pool: str = "original"
  skip_dead_work: bool = True
  head_hidden_layers: int = 0
  head_dropout: float = 0.1
  head_init: str = "vpt"
  hooks: hooks_lib.Hooks = hooks_lib.NO_HOOKS
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  options: vit_options.TowerOptions = vit_options.PLAIN
  attention_kernel: str = "einsum"

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
      if self.hooks.reads_images:
        raise ValueError("side-tuning reads the images, so it cannot run from cached "
                         "features; call the model on images")
      return head(images, train=train)
    size, patch = vit_variants.decode_variant(self.variant)
    if images.shape[1] % patch or images.shape[2] % patch:
      raise ValueError(f"image size {images.shape[1:3]} is not divisible by the patch "
                       f"size {patch}; resize to a multiple of {patch}")
    options = self.options
    vit_options.check(options)
    sizes = vit_variants.geometry(self.variant)
    tokens, pixel_prompts = self._patch_tokens(images, size.width, patch, sizes, train)
    batch = tokens.shape[0]
    prompts = (self.hooks.prompts(batch, sizes, train=train) if pixel_prompts is None
               else jnp.broadcast_to(pixel_prompts, (1, batch) + pixel_prompts.shape))
    prompts = None if prompts is None else prompts.astype(tokens.dtype)
    method_inputs = self.hooks.block_inputs(batch, sizes, tokens.dtype, train=train)
    queries = self.hooks.query_tokens(batch, sizes, train=train)

    flavour = vit_variants.variant_flavour(self.variant)
    # MAE's "original" representation is the mean of every non-CLS token,
    # prompts included (the reference's global pool), i.e. imgprompt_pool.
    pool = "imgprompt_pool" if flavour == "mae" and self.pool == "original" else self.pool
    pool = "map" if options.pooling == "map" else pool
    # The flavour's stochastic depth, only when the backbone trains in train
    # mode (full), unless the method has its own.
    drop_path, drop_path_deterministic = self.hooks.stochastic_depth(
        vit_variants.FLAVOUR_DROP_PATH[flavour], not (train and self.backbone_dropout), train=train)
    encoded = Encoder(
        depth=size.depth, mlp_dim=size.mlp_dim, num_heads=size.num_heads,
        dropout_rate=self.dropout_rate, pool=pool,
        skip_dead_work=self.skip_dead_work,
        stochastic_depth=drop_path, hooks=self.hooks, attention_kernel=self.attention_kernel,
        dtype=self.dtype, remat=self.remat, flavour=flavour, options=options,
        name="Transformer")(
            tokens, prompts, deterministic=not (train and self.backbone_dropout),
            method_inputs=method_inputs,
            drop_path_deterministic=drop_path_deterministic, queries=queries)
    if queries is not None:
      encoded, query_outputs = encoded
    features = self._pool(encoded, pool, size)
    if flavour == "mae":  # a fresh LayerNorm; MAE's checkpoint has none
      features = lean_ops.LayerNorm(epsilon=vit_blocks.LAYER_NORM_EPSILON, dtype=self.dtype,
                              name="fc_norm")(features)
    features = self.hooks.pooled_features(images, features.astype(jnp.float32), self.dtype)
    if queries is not None:
      features = self.hooks.combine_queries(features, query_outputs.astype(jnp.float32))
    if return_features:
      return features
    return head(features, train=train)

  def _patch_tokens(self, images, width: int, patch: int, sizes, train: bool):
    """(B, H, W, 3) -> ([CLS (if the tower has one), patches] (B, (1 +) N, D),
    pixel-space prompt tokens (P, D) or None: ``hooks.embed_patches``)."""
    patch_conv = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                         use_bias=self.options.patch_bias, dtype=self.dtype, name="embedding")

    def embed(pixels):  # the patch embedding's output passes projection_output (SSF, FacT)
      return self.hooks.projection_output("embedding", pixels, patch_conv(pixels), (width,),
                                          3, self.dtype)

    tokens, pixel_prompts = self.hooks.embed_patches(images, embed, sizes, train=train)
    if not self.options.class_token:
      batch, height, grid_width, channels = tokens.shape
      return tokens.reshape(batch, height * grid_width, channels), pixel_prompts
    return with_cls(tokens, self.param("cls", nn.initializers.zeros, (1, 1, width))), pixel_prompts

  def _pool(self, encoded, pool: str, size: vit_variants.ViTSize):
    """(B, T, D) -> the pooled (B, D) (or (B, projection)) features."""
    options, num_prompts = self.options, self.hooks.prompt_tokens()
    if options.pooling == "map":  # [prompts, patches]: no CLS, prompts come first
      attended = encoded if options.map_attends_prompts else encoded[:, num_prompts:]
      features = map_head.MAPHead(size.num_heads, size.mlp_dim, options.layer_norm_epsilon,
                                  dtype=self.dtype, name="MAPHead_0")(attended)
    else:
      features = pool_tokens(encoded, pool, num_prompts)
    if options.projection:  # CLIP's proj: a bias-free (D, E) matrix
      features = nn.Dense(options.projection, use_bias=False, dtype=self.dtype,
                          name="projection")(features)
    return features
