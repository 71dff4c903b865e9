"""Prompt parameters of the prompt-based methods.

* VPT (Jia et al., "Visual Prompt Tuning", ECCV 2022): prompts are inserted
  after CLS and before the patch tokens and receive no position embedding.
  Shallow VPT has one set (P, D); deep VPT has one set per block, the first
  inserted after the embedding and each later one replacing the previous
  block's prompt outputs.
* VFPT (Zeng et al., "Visual Fourier Prompt Tuning", NeurIPS 2024; cvpt.md 4):
  VPT-deep whose first floor(P * percentage) prompts of every set pass through
  a parameter-free 2-D FFT (real part kept) before insertion.
* CVPT (Huang et al., "CVPT: Cross Visual Prompt Tuning", ICCV 2025; cvpt.md
  1): per-block prompts (L, m, D) that never enter the token sequence; the
  tokens cross-attend to them (see ``vit.Encoder1DBlock``).
* E2VPT (Han et al., "E^2VPT: An Effective and Efficient Approach for Visual
  Prompt Tuning", ICCV 2023; cvpt.md 3): per-block key-value prompts
  (L, H, N_kv, D/H) appended, already projected, to every attention's keys and
  values (used with VPT-deep visual prompts).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def prompt_init_bound(patch_size: int, prompt_dim: int) -> float:
  """The reference's Xavier-uniform bound from the patch conv fan-in.

  sqrt(6 / (3 * patch^2 + prompt_dim)); 0.0625 for ViT-B/16.
  """
  return math.sqrt(6.0 / (3 * patch_size * patch_size + prompt_dim))


def uniform_symmetric(bound: float):
  """Initializer drawing U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
  return init


def per_example_dropout(prompts, batch_size: int, rate: float, train: bool):
  """(S, ...) prompt sets -> (S, batch_size, ...), dropped out while training.

  The broadcast comes first, so every example gets its own mask (inverted
  dropout, scale 1 / (1 - rate)), as the references do. Call from a compact
  method: the Dropout module joins the calling module.
  """
  prompts = jnp.broadcast_to(prompts[:, None],
                             (prompts.shape[0], batch_size) + prompts.shape[1:])
  return nn.Dropout(rate)(prompts, deterministic=not train)


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
    raise ValueError(f"Unknown Fourier dimension {dimension!r}; choose one of "
                     f"{FOURIER_DIMENSIONS}")
  if not 0 < num_fourier <= prompts.shape[-2]:
    raise ValueError(f"num_fourier must lie in [1, {prompts.shape[-2]}], got {num_fourier}")
  fourier = prompts[..., :num_fourier, :]
  if dimension in ("all", "hidden"):
    fourier = jnp.fft.fft(fourier, axis=-1)
  if dimension in ("all", "sequence"):
    fourier = jnp.fft.fft(fourier, axis=-2)
  return jnp.concatenate(
      [jnp.real(fourier).astype(prompts.dtype), prompts[..., num_fourier:, :]], axis=-2)


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
