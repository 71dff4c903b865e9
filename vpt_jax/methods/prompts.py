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
  values (used with VPT-deep visual prompts; no pruning).

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
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models.prompts import per_example_dropout, prompt_init_bound, uniform_symmetric

E2VPT_PARAMS = r"e2vpt/.*"
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
  """VPT: ``num_prompts`` prompts per set, one set (shallow) or one per block (deep)."""
  num_prompts: int
  deep: bool = False
  dropout: float = 0.0
  projection: int = -1

  def prompt_tokens(self) -> int:
    return self.num_prompts

  def fourier(self) -> tuple[int, str]:
    """(how many prompts of every set are Fourier-transformed, over which axes)."""
    return 0, "all"

  def prompts(self, batch_size, geometry, *, train):
    if not self.num_prompts:
      return None
    num_fourier, dimension = self.fourier()
    return VisualPrompts(
        num_prompts=self.num_prompts, num_sets=geometry.depth if self.deep else 1,
        width=geometry.width, patch_size=geometry.patch_size,
        projection=self.projection, dropout_rate=self.dropout,
        num_fourier=num_fourier, fourier_dimension=dimension, name="vpt")(
            batch_size, train=train)


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
  return dict(num_prompts=int(section.kv_prompts), dropout=float(section.kv_dropout))


def _check_e2vpt(settings: base.Settings, spec, geometry) -> None:
  del spec, geometry
  if settings["num_prompts"] < 1:
    base.fail(f"e2vpt.kv_prompts must be >= 1, got {settings['num_prompts']}")


def _prompt_method(name: str, rules, *, deep: bool, fresh=(base.VPT_PARAMS,), make_hooks=None,
                   **fields) -> base.Method:
  """A method with VPT prompts (fresh ``vpt/``), SGD and VPT's head."""
  if make_hooks is None:
    make_hooks = lambda spec: VptOptions(**_vpt_fields(spec, deep))
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
                               "attention, plus the head (no pruning)",
                   read_settings=_e2vpt_settings, settings_check=_check_e2vpt,
                   make_hooks=lambda spec: E2vptOptions(
                       **_vpt_fields(spec, True), kv_prompts=spec["e2vpt"]["num_prompts"],
                       kv_dropout=spec["e2vpt"]["dropout"])),
)
