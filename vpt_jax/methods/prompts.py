"""Prompt methods: VPT (shallow, deep, +bias), VFPT and E2VPT.

* VPT (Jia et al., "Visual Prompt Tuning", ECCV 2022): prompts are inserted
  after CLS and before the patch tokens and receive no position embedding.
  Shallow VPT has one set (P, D); deep VPT has one set per block, the first
  inserted after the embedding and each later one replacing the previous
  block's prompt outputs (the backbone's ``Encoder`` does the insertion).
* VFPT (Zeng et al., "Visual Fourier Prompt Tuning", NeurIPS 2024; cvpt.md 4):
  VPT-deep whose first floor(P * percentage) prompts of every set pass through
  a parameter-free 2-D FFT (real part kept) before insertion.
* E2VPT (Han et al., "E^2VPT: An Effective and Efficient Approach for Visual
  Prompt Tuning", ICCV 2023; cvpt.md 3): per-block key-value prompts
  (L, H, N_kv, D/H) appended, already projected, to every attention's keys and
  values (used with VPT-deep visual prompts), and the pruning masks and
  rewinding of ``e2vpt_pruning``.

Parameters: ``vpt/shallow``, ``vpt/deep``, ``vpt/projection`` and
``e2vpt/kv_prompts``. The prompt count, dropout and projection come from the
shared ``config.prompt`` section (top-level spec fields).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from vpt_jax import errors
from vpt_jax.methods import base
from vpt_jax.methods import e2vpt_pruning
from vpt_jax.methods import prompt_ablations
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models import pixel_prompts
from vpt_jax.models.prompts import per_example_dropout, prompt_init_bound, uniform_symmetric

# Key-value prompts and the pruning phase's masks (e2vpt_pruning).
E2VPT_PARAMS = r"e2vpt(_masks)?/.*"
FOURIER_DIMENSIONS = ("all", "hidden", "sequence")


def fourier_prompts(prompts, num_fourier: int, dimension: str = "all"):
  """VFPT's Fourier prompts: (..., P, D) -> (..., P, D), no parameters.

  The first n_f = ``num_fourier`` prompts (VFPT's default "prepend" location)
  are replaced by the real part of their discrete Fourier transform,

    "all":      F = Re(FFT_seq(FFT_hidden(P_f)))  (a 2-D DFT of the (n_f, D) block)
    "hidden":   F = Re(FFT_hidden(P_f))
    "sequence": F = Re(FFT_seq(P_f))

  where FFT_hidden runs over D and FFT_seq over the n_f Fourier prompts only
  (not all P). No inverse transform and no normalisation, as the reference
  (runtsang/VFPT ``vit_fourier.py``); the other P - n_f prompts are unchanged.
  Re o FFT is linear, so gradients flow to the prompts unchanged in kind.
  """
  if dimension not in FOURIER_DIMENSIONS:
    raise errors.UserError(f"Unknown Fourier dimension {dimension!r}; choose one of "
                           f"{FOURIER_DIMENSIONS}")
  if not 0 < num_fourier <= prompts.shape[-2]:
    raise errors.UserError(f"num_fourier must lie in [1, {prompts.shape[-2]}], got {num_fourier}")
  fourier = prompts[..., :num_fourier, :]
  if dimension in ("all", "hidden"):
    fourier = jnp.fft.fft(fourier, axis=-1)
  if dimension in ("all", "sequence"):
    fourier = jnp.fft.fft(fourier, axis=-2)
  return jnp.concatenate(
      [jnp.real(fourier).astype(prompts.dtype), prompts[..., num_fourier:, :]], axis=-2)


class VisualPrompts(nn.Module):
  """Learned prompt sets, projected, broadcast to the batch and dropped out.

  Parameters: ``shallow`` (P, d) and, for deep VPT, ``deep`` (S - 1, P, d),
  where d = ``projection`` if >= 1 (then a shared Dense(d -> width) named
  ``projection`` maps them, kaiming-normal fan-out as the reference) else width.
  Dropout is applied after broadcasting, so every example gets its own mask.
  ``repeat`` > 1 repeats the (single) set that many times before the dropout.
  With ``num_fourier`` > 0 (VFPT) the first ``num_fourier`` prompts of every
  set are Fourier-transformed after the dropout (``fourier_prompts``).
  """
  num_prompts: int
  num_sets: int
  width: int
  patch_size: int
  projection: int = -1
  dropout_rate: float = 0.0
  num_fourier: int = 0
  fourier_dimension: str = "all"
  repeat: int = 1

  @nn.compact
  def __call__(self, batch_size: int, *, train: bool):
    """Returns prompts of shape (num_sets, batch_size, num_prompts, width)."""
    if self.num_prompts < 1:
      raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
    prompt_dim = self.projection if self.projection >= 1 else self.width
    init = uniform_symmetric(prompt_init_bound(self.patch_size, prompt_dim))
    sets = [self.param("shallow", init, (self.num_prompts, prompt_dim))[None]]
    if self.num_sets > 1:
      sets.append(self.param("deep", init, (self.num_sets - 1, self.num_prompts, prompt_dim)))
    prompts = jnp.concatenate(sets, axis=0)
    if self.projection >= 1:
      prompts = nn.Dense(
          self.width, name="projection",
          kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
          bias_init=uniform_symmetric(1.0 / math.sqrt(prompt_dim)))(prompts)
    if self.repeat > 1:  # one set for every block (DEEP_SHARED), dropped out per block
      prompts = jnp.broadcast_to(prompts, (self.repeat,) + prompts.shape[1:])
    prompts = per_example_dropout(prompts, batch_size, self.dropout_rate, train)
    if self.num_fourier:
      prompts = fourier_prompts(prompts, self.num_fourier, self.fourier_dimension)
    return prompts


class KeyValuePrompts(nn.Module):
  """E2VPT's key-value prompts: (depth, H, N_kv, D/H), shared between keys and values.

  Initialised as the reference's ``ORIGIN_INIT=2`` (kaiming-uniform on each
  block's 3-D (H, N_kv, D/H) tensor: fan_in = N_kv * D/H, bound
  sqrt(6 / (N_kv * D/H))). ``SHARE_PARAM_KV=True``: one tensor serves as both the
  key and the value prompt. Returns (depth, B, N_kv, H, D/H) after the
  per-example dropout (the reference's default rate is 0).
  """
  num_prompts: int
  depth: int
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, batch_size: int, *, train: bool):
    if self.num_prompts < 1:
      raise ValueError(f"E2VPT needs key-value prompts >= 1, got {self.num_prompts}")
    bound = math.sqrt(6.0 / (self.num_prompts * self.head_dim))
    shape = (self.depth, self.num_heads, self.num_prompts, self.head_dim)
    prompts = self.param("kv_prompts", uniform_symmetric(bound), shape)
    # -> (depth, N_kv, H, D/H): the token-major layout of projected keys.
    return per_example_dropout(jnp.swapaxes(prompts, 1, 2), batch_size, self.dropout_rate,
                               train)


@dataclasses.dataclass(frozen=True)
class VptOptions(hooks_lib.Hooks):
  """VPT: ``num_prompts`` prompts per set, one set (shallow) or one per block (deep).

  The ablation fields (``prompt_ablations``; defaults = plain VPT):
  ``location`` (prepend, add, add-1 or a pixel location), ``deep_layers`` k
  (deep prompts in the first k blocks, 0 = all), ``reverse`` (the last k
  instead; the first of them is the ``shallow`` parameter), ``shared`` (one
  set for all blocks) and ``noexpand`` (prompts leave after block k - 1).
  ``image_size`` sizes the add location's sets (1 + (image_size / P)^2 tokens).
  """
  num_prompts: int
  deep: bool = False
  dropout: float = 0.0
  projection: int = -1
  location: str = "prepend"
  deep_layers: int = 0
  reverse: bool = False
  shared: bool = False
  noexpand: bool = False
  image_size: int = 0

  def prompt_tokens(self) -> int:
    in_sequence = self.location == "prepend" or self.location.startswith("prepend-pixel")
    return self.num_prompts if in_sequence else 0

  def fourier(self) -> tuple[int, str]:
    """(how many prompts of every set are Fourier-transformed, over which axes)."""
    return 0, "all"

  def _blocks(self, depth: int) -> tuple[int, ...]:
    """The blocks a prompt set enters before."""
    if not self.deep:
      return (0,)
    k = self.deep_layers or depth
    return tuple(range(depth - k, depth)) if self.reverse else tuple(range(k))

  def prompt_plan(self, depth: int) -> hooks_lib.PromptPlan:
    k = self.deep_layers or depth
    return hooks_lib.PromptPlan(
        location="add" if self.location in ("add", "add-1") else "prepend",
        layers=self._blocks(depth), remove_at=k if self.noexpand and k < depth else -1,
        first_replaces=self.reverse)

  def embed_patches(self, images, embed, geometry, *, train):
    if self.location not in pixel_prompts.PIXEL_LOCATIONS:
      return super().embed_patches(images, embed, geometry, train=train)
    return pixel_prompts.PixelPrompts(self.location, self.num_prompts, geometry.width,
                                      geometry.patch_size, name="vpt")(images, embed)

  def prompts(self, batch_size, geometry, *, train):
    if not self.num_prompts or self.location in pixel_prompts.PIXEL_LOCATIONS:
      return None
    tokens = {"add": 1 + (self.image_size // geometry.patch_size) ** 2,
              "add-1": 1}.get(self.location, self.num_prompts)
    num_sets = len(self._blocks(geometry.depth))
    num_fourier, dimension = self.fourier()
    return VisualPrompts(
        num_prompts=tokens, num_sets=1 if self.shared else num_sets,
        width=geometry.width, patch_size=geometry.patch_size,
        projection=self.projection, dropout_rate=self.dropout,
        num_fourier=num_fourier, fourier_dimension=dimension,
        repeat=num_sets if self.shared else 1, name="vpt")(batch_size, train=train)


@dataclasses.dataclass(frozen=True)
class VfptOptions(VptOptions):
  """VFPT: the fraction of each prompt set that is Fourier-transformed, and how."""
  percentage: float = 0.5
  dimension: str = "all"

  def fourier(self) -> tuple[int, str]:
    return int(math.floor(self.num_prompts * self.percentage)), self.dimension


@dataclasses.dataclass(frozen=True)
class E2vptOptions(VptOptions):
  """E2VPT: VPT's prompts plus ``kv_prompts`` key-value prompts per block."""
  kv_prompts: int = 5
  kv_dropout: float = 0.0
  # Pruning (e2vpt_pruning): learnable token/piece masks, or the rewinding's fixed ones.
  learn_masks: bool = False
  pieces: int = 16
  pruned_tokens: tuple = ()
  pruned_pieces: tuple = ()

  def prompts(self, batch_size, geometry, *, train):
    prompts = super().prompts(batch_size, geometry, train=train)
    if self.learn_masks:
      return e2vpt_pruning.PromptMasks(self.pieces, name="e2vpt_masks")(prompts)
    if self.pruned_tokens or self.pruned_pieces:
      tokens, pieces = e2vpt_pruning.fixed_masks(self.num_prompts, self.pieces,
                                                 self.pruned_tokens, self.pruned_pieces)
      return prompts * e2vpt_pruning.expand_masks(tokens, pieces, prompts.shape[-1])
    return prompts

  def block_inputs(self, batch_size, geometry, dtype, *, train):
    del dtype  # cast to the keys' dtype inside the attention
    return KeyValuePrompts(
        self.kv_prompts, geometry.depth, geometry.num_heads,
        geometry.width // geometry.num_heads, dropout_rate=self.kv_dropout,
        name="e2vpt")(batch_size, train=train)

  def extra_keys_values(self, block):
    return block.inputs


def _vpt_fields(spec: Mapping[str, Any], deep: bool) -> dict[str, Any]:
  """VptOptions' fields from the spec's shared prompt settings."""
  return dict(num_prompts=spec["num_prompts"], deep=deep, dropout=spec["prompt_dropout"],
              projection=spec["prompt_projection"])


def _vfpt_settings(config) -> base.Settings:
  section = config.vfpt
  return dict(percentage=float(section.percentage), dimension=str(section.dimension))


def _check_vfpt(settings: base.Settings, spec, geometry) -> None:
  del geometry
  if settings["dimension"] not in FOURIER_DIMENSIONS:
    base.fail(f"Unknown vfpt.dimension {settings['dimension']!r}; choose one of "
              f"{FOURIER_DIMENSIONS}")
  if math.floor(spec["num_prompts"] * settings["percentage"]) < 1 or settings["percentage"] > 1:
    base.fail(f"vfpt.percentage {settings['percentage']} of {spec['num_prompts']} prompts "
              "Fourier-transforms no prompt (or more than all); use a value in (0, 1] with "
              "floor(num_prompts * percentage) >= 1")


def _e2vpt_settings(config) -> base.Settings:
  section = config.e2vpt
  settings = dict(num_prompts=int(section.kv_prompts), dropout=float(section.kv_dropout))
  tokens = [int(t) for t in base.names(section.pruned_tokens)]
  pieces = e2vpt_pruning.parse_pruned_pieces(section.pruned_pieces)
  if section.prune or tokens or pieces:  # only then: earlier specs stay as they were
    settings["masks"] = dict(learn=bool(section.prune), pieces=int(section.pieces),
                             pruned_tokens=tokens, pruned_pieces=pieces)
  return settings


def _check_e2vpt(settings: base.Settings, spec, geometry) -> None:
  if settings["num_prompts"] < 1:
    base.fail(f"e2vpt.kv_prompts must be >= 1, got {settings['num_prompts']}")
  masks = settings.get("masks")
  if not masks:
    return
  pieces, num_prompts = masks["pieces"], spec["num_prompts"]
  if pieces < 1 or geometry.width % pieces:
    base.fail(f"e2vpt.pieces={pieces} must divide the width {geometry.width} (16 for ViT-B)")
  if masks["learn"] and (masks["pruned_tokens"] or masks["pruned_pieces"]):
    base.fail("e2vpt.prune learns the masks; the rewinding's e2vpt.pruned_tokens/"
              "pruned_pieces fix them: set one or the other")
  if any(not 0 <= t < num_prompts for t in masks["pruned_tokens"]) or any(
      not (0 <= t < num_prompts and 0 <= p < pieces) for t, p in masks["pruned_pieces"]):
    base.fail(f"e2vpt.pruned_tokens/pruned_pieces name a token outside [0, {num_prompts}) "
              f"or a piece outside [0, {pieces})")


def _e2vpt_hooks(spec) -> E2vptOptions:
  settings = spec["e2vpt"]
  masks = settings.get("masks") or {}
  return E2vptOptions(
      **_vpt_fields(spec, True), kv_prompts=settings["num_prompts"],
      kv_dropout=settings["dropout"], learn_masks=bool(masks.get("learn", False)),
      pieces=int(masks.get("pieces", 16)),
      pruned_tokens=tuple(masks.get("pruned_tokens", ())),
      pruned_pieces=tuple(tuple(pair) for pair in masks.get("pruned_pieces", ())))


def _prompt_method(name: str, rules, *, deep: bool, fresh=(base.VPT_PARAMS,), make_hooks=None,
                   **fields) -> base.Method:
  """A method with VPT prompts (fresh ``vpt/``), SGD and VPT's head."""
  if make_hooks is None:  # plain VPT, shaped by the prompt ablation options
    make_hooks = lambda spec: VptOptions(**_vpt_fields(spec, deep),
                                         **prompt_ablations.hook_fields(spec))
  return base.Method(name, rules, fresh=fresh, uses_prompts=True, deep_prompts=deep,
                     make_hooks=make_hooks, **fields)


METHODS = (
    _prompt_method("vpt_deep", base.train_only(base.VPT_PARAMS), deep=True,
                   description="VPT-deep: a prompt set before every block, plus the head"),
    _prompt_method("vpt_shallow", base.train_only(base.VPT_PARAMS), deep=False,
                   description="VPT-shallow: one prompt set after the embedding, plus the "
                               "head"),
    _prompt_method("vpt+bias", base.train_only(base.VPT_PARAMS, base.BIAS_PARAMS), deep=True,
                   description="VPT-deep prompts and every bias vector, plus the head"),
    _prompt_method("vfpt", base.train_only(base.VPT_PARAMS), deep=True, settings="vfpt",
                   description="VFPT: VPT-deep with part of every prompt set Fourier-"
                               "transformed, plus the head",
                   read_settings=_vfpt_settings, settings_check=_check_vfpt,
                   make_hooks=lambda spec: VfptOptions(**_vpt_fields(spec, True),
                                                       **spec["vfpt"])),
    _prompt_method("e2vpt", base.train_only(base.VPT_PARAMS, E2VPT_PARAMS), deep=True,
                   fresh=(base.VPT_PARAMS, E2VPT_PARAMS), settings="e2vpt",
                   description="E2VPT: VPT-deep prompts and key-value prompts in every "
                               "attention, plus the head (pruning masks: e2vpt.prune)",
                   read_settings=_e2vpt_settings, settings_check=_check_e2vpt,
                   make_hooks=_e2vpt_hooks),
)
