"""The hook points a backbone offers to adaptation methods, and what it reads from a method.

A backbone calls the hooks of one ``Hooks`` object (a frozen, hashable
dataclass, one per method, held as a module attribute) and never imports a
method. Every hook defaults to "no change", so a method overrides only the
points it uses. The hooks are called from inside the backbone's ``@nn.compact``
methods: a submodule a hook creates (``LoRA(..., name="lora_query")(x)``) binds
to the calling module, so its parameters live exactly where the backbone
calls the hook (see each hook for the module).

Model level (``vit.VisionTransformer``, names relative to the model):
  * ``prompts``: token sets inserted after CLS (VPT shallow and deep), and
    ``prompt_tokens`` for the pooling layout [CLS, prompts, patches];
    ``prompt_plan`` says where the sets enter (VPT's location and depth
    ablations) and ``embed_patches`` lets pixel-space prompts act on the
    images and the patch convolution;
  * ``block_inputs``: per-block arrays with a leading depth axis, block l gets
    slice l as ``BlockContext.inputs`` (CVPT's cross prompts, E2VPT's
    key-value prompts);
  * ``stochastic_depth``: the drop-path rate and when it is off (CVPT);
  * ``query_tokens``, ``combine_queries``: per-block query-only tokens and how
    their outputs join the pooled features before the head (VQT);
  * ``pooled_features``: the pooled (B, D) features before the head
    (side-tuning); ``reads_images`` says they need the images, so the model
    refuses to run from cached features.

Block level (``vit_blocks.Encoder1DBlock`` and its ``Attention``, names relative to
``Transformer/encoderblock_{i}`` resp. its ``MultiHeadDotProductAttention_0``):
  * ``projection_output``: the output of a q/k/v/out projection (in Attention),
    of the MLP's Dense_0/Dense_1 (in MlpBlock) and of the patch embedding
    ("embedding", model level) (LoRA, SSF, FacT);
  * ``norm_output``: the output of LayerNorm_0/LayerNorm_1 (block) and of
    encoder_norm (``Transformer``) (SSF);
  * ``attention_input``: the normalised attention input before q/k/v
    (RepAdapter);
  * ``extra_keys_values``: already projected (B, N_kv, H, D/H) tokens
    prepended to the keys and the values (E2VPT);
  * ``block_input``, ``attention_branch``, ``after_attention``, ``mlp_input``,
    ``block_output``: the residual stream around attention and MLP (CVPT's
    cross-attention at its insert positions);
  * ``mlp_branch``: the MLP branch before its residual (adapters);
  * ``attention_parallel``, ``mlp_parallel``: a term added to the stream
    beside the attention resp. MLP branch, from the branch's normalised input
    and the stream it joins (AdaptFormer, Convpass).

Block hooks must treat every token row independently (or see all of them):
a block may compute only the first rows (``num_outputs``) or see prompts only
as keys and values (``kv_only``). (Convpass mixes neighbouring patch rows but
never CLS with them, so CLS alone, the only ``num_outputs`` used, stays exact.) Prompts are made in float32 and cast to the
compute dtype by the backbone; ``block_inputs`` get the dtype and cast as
their method needs. A hook object's fields must not reuse a hook's name (the
field would hide the hook).

``Method`` is the view of an adaptation method the backbone families read
(``backbones.Family.build`` / ``validate``); ``vpt_jax.methods.base.Method``
implements it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol


class Geometry(NamedTuple):
  """The backbone sizes a method's additions are shaped by."""
  depth: int
  width: int
  num_heads: int
  patch_size: int
  mlp_dim: int = 0  # the MLP's hidden width (0: not a ViT)


class PromptPlan(NamedTuple):
  """Where the sets of ``Hooks.prompts`` enter the ViT encoder (VPT's ablations).

  Attributes:
    location: "prepend" (P tokens after CLS) or "add" (added to every token:
      sets of shape (B, T, D) with T = the sequence length or 1).
    layers: set s enters before block ``layers[s]``; None = 0..S-1 (shallow,
      or deep in every block).
    remove_at: prepended prompt tokens leave the sequence before this block
      (-1 = never).
    first_replaces: the first prepended set overwrites the P tokens after CLS
      (patch tokens when none were prepended before; VPT's REVERSE_DEEP code).
  """
  location: str = "prepend"
  layers: Any = None
  remove_at: int = -1
  first_replaces: bool = False


class BlockContext(NamedTuple):
  """What a block hands its hooks.

  Attributes:
    attention: the block's own attention module, (B, Nq, D) queries and
      (B, Nk, D) keys/values -> (B, Nq, D); calling it reuses its parameters.
    inputs: this block's slice of ``Hooks.block_inputs`` (None without).
    dtype: the block's compute dtype.
    train: the method's own dropout is on: training with the stochastic
      depth the method's ``stochastic_depth`` switched on (its hooks draw
      from the "dropout" rng, e.g. with ``nn.Dropout``).
    drop_path: this block's drop-path rate (timm's linear ramp over the
      blocks), for a method that drops its own branches as the block does.
  """
  attention: Callable[..., Any]
  inputs: Any
  dtype: Any
  train: bool = False
  drop_path: float = 0.0


@dataclasses.dataclass(frozen=True)
class Hooks:
  """No method: every hook returns its input unchanged. Methods subclass it."""

  # Whether ``pooled_features`` reads the images (then cached features cannot stand in).
  reads_images = False
  # Whether ``projection_output`` changes the MLP's two Dense layers (Dense_0, Dense_1),
  # which a SwiGLU FFN (DINOv2-g) does not have: such a backbone refuses the method.
  changes_mlp_projections = False

  def prompt_tokens(self) -> int:
    """How many prompt tokens follow CLS in the output sequence (pooling layout)."""
    return 0

  def prompts(self, batch_size: int, geometry: Geometry, *, train: bool):
    """Prompt sets (S, B, P, D), S = 1 (shallow) or depth (deep), or None."""
    del batch_size, geometry, train
    return None

  def prompt_plan(self, depth: int) -> PromptPlan:
    """Where the ``prompts`` sets enter a ``depth``-block encoder (default: after CLS,
    set l before block l)."""
    del depth
    return PromptPlan()

  def embed_patches(self, images, embed, geometry: Geometry, *, train: bool):
    """(patch tokens (B, h, w, D), prompt tokens (P, D) or None) from the images.

    ``embed`` is the backbone's patch convolution (B, H, W, C) -> (B, h, w, D);
    pixel-space prompts (VPT's pad, below and prepend-pixel) act here.
    """
    del geometry, train
    return embed(images), None

  def block_inputs(self, batch_size: int, geometry: Geometry, dtype, *, train: bool):
    """A pytree of arrays with a leading depth axis (block l reads slice l), or None."""
    del batch_size, geometry, dtype, train
    return None

  def query_tokens(self, batch_size: int, geometry: Geometry, *, train: bool):
    """Query-only tokens (depth, B, T, D) run through block l beside its tokens, or None."""
    del batch_size, geometry, train
    return None

  def combine_queries(self, features, query_outputs):
    """features (B, D) and the blocks' query outputs (depth, B, T, D) -> head input (B, F)."""
    del query_outputs
    return features

  def stochastic_depth(self, rate: float, deterministic: bool, *,
                       train: bool) -> tuple[float, bool]:
    """(drop-path rate, whether it is off) given the backbone's own choice."""
    del train
    return rate, deterministic

  def pooled_features(self, images, features, dtype):
    """images (B, H, W, 3), features (B, D) float32 -> features (B, D)."""
    del images, dtype
    return features

  def projection_output(self, name: str, inputs, outputs, out_features: tuple[int, ...],
                        num_in_axes: int, dtype, block: Optional[BlockContext] = None):
    """Linear map ``name``: inputs (..., in...) -> outputs (..., out...).

    query/key/value/out (attention), Dense_0/Dense_1 (MLP) get their block's
    context (None when CVPT reuses the attention); "embedding" gets the images
    (B, H, W, 3), its outputs are (B, H/P, W/P, D) and ``block`` is None.
    """
    del name, inputs, out_features, num_in_axes, dtype, block
    return outputs

  def norm_output(self, name: str, normed):
    """LayerNorm ``name`` (LayerNorm_0/LayerNorm_1, encoder_norm): its output (..., D)."""
    del name
    return normed

  def attention_input(self, normed, block: BlockContext):
    """The normalised rows (B, N, D) the attention projects (queries and keys/values)."""
    del block
    return normed

  def extra_keys_values(self, block: BlockContext):
    """Projected tokens (B, N_kv, H, D/H) prepended to keys and values, or None."""
    del block
    return None

  def block_input(self, x, block: BlockContext):
    """The residual stream (B, N, D) entering the block."""
    del block
    return x

  def attention_branch(self, branch, x, block: BlockContext):
    """The attention branch (B, N, D) before drop path; x the stream it joins."""
    del x, block
    return branch

  def after_attention(self, x, block: BlockContext):
    """The stream (B, N, D) after the attention residual."""
    del block
    return x

  def mlp_input(self, normed, x, block: BlockContext):
    """The normalised MLP input (B, N, D); x the stream before the norm."""
    del x, block
    return normed

  def mlp_branch(self, branch, block: BlockContext):
    """The MLP branch (B, N, D) before drop path."""
    del block
    return branch

  def attention_parallel(self, normed, x, block: BlockContext):
    """A term (B, N, D) added beside the attention branch, or None.

    normed: the attention's input LN0(x); x: the stream (B, N, D) it joins.
    """
    del normed, x, block
    return None

  def mlp_parallel(self, normed, x, block: BlockContext):
    """A term (B, N, D) added beside the MLP branch, or None.

    normed: the MLP's input (after ``mlp_input``); x: the stream (B, N, D) it joins.
    """
    del normed, x, block
    return None

  def block_output(self, x, block: BlockContext):
    """The stream (B, N, D) leaving the block."""
    del block
    return x


NO_HOOKS = Hooks()

# timm's drop_path_rate in the official codes of the methods that train with it
# (CVPT, SSF, DiffFit, LN-tune, FacT, RepAdapter).
TRAINING_DROP_PATH = 0.1


@dataclasses.dataclass(frozen=True)
class TrainingDropPath(Hooks):
  """Stochastic depth at the method's own ``drop_path`` (timm's ramp) whenever training.

  On whenever training (at rate 0 it drops nothing), so ``BlockContext.train``
  also switches on the method's own dropout. Keyword-only, so a subclass's
  own fields keep their positions.
  """
  drop_path: float = dataclasses.field(default=TRAINING_DROP_PATH, kw_only=True)

  def stochastic_depth(self, rate, deterministic, *, train):
    del rate, deterministic  # the method's own, whenever training
    return self.drop_path, not train


class Method(Protocol):
  """What a backbone family reads from an adaptation method (``methods.base.Method``).

  ``name``, ``uses_prompts`` and ``deep_prompts`` (VPT prompts in the
  sequence), ``backbone_dropout`` (backbone in train mode while tuning),
  ``settings`` (its spec section, "" = none), ``head_hidden_layers`` and
  ``head_init`` (the head, see ``backbones.head_settings``).
  """
  name: str
  uses_prompts: bool
  deep_prompts: bool
  backbone_dropout: bool
  settings: str
  head_hidden_layers: int
  head_init: str

  def hooks(self, spec: Mapping[str, Any]) -> Hooks:
    """The hook object the method adds to a backbone built from ``spec``."""

  def check_settings(self, spec: Mapping[str, Any], geometry: Geometry) -> None:
    """Raises ValueError if the method's spec section does not fit the backbone."""

