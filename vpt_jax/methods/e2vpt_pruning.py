"""E2VPT's prompt pruning and rewinding (Han et al., ICCV 2023), as ChengHan111/E2VPT runs it.

The reference (``vit_prompt_VK.py``, ``trainer.py``, ``tune_vtab_PruningRewind_CVK.py``)
with ``MASK_CLS_TOKEN=True``:

1. **Masks.** The visual prompts P (every set, shallow and deep) are multiplied,
   after their dropout, by a token mask t (N_p,) and a piece mask s
   (N_p, pieces = 16), both starting at ones and trained with the prompts
   ("prompt" is in their names). A piece covers the dimensions d with
   d mod pieces = j: the reference expands s with ``repeat((1, D / pieces))``,
   which tiles (the paper speaks of contiguous segments; we follow the code).
   Mask parameters: ``e2vpt_masks/tokens`` and ``e2vpt_masks/pieces``.
2. **Importance.** After training, the gradient of the loss with respect to
   each mask entry, averaged over the training batches in eval mode (signed,
   not its magnitude; ``NORMALIZE_SCORES_BY_TOKEN=False``): ``mask_importance``.
   (The reference's pass also calls ``optimizer.step()``, but with a fresh
   warmup schedule's first learning rate, 0, so nothing moves; we take no step.)
3. **Pruning levels.** For p in {10, ..., 90}%: int(N p / 100) tokens
   (at most N - 1, stopping at the first capped level) and per token
   int(pieces p / 100) pieces (at most pieces - 4), those of lowest score
   (``MASK_RESERVE=False``): ``pruning_levels``.
4. **Rewinding.** Training again from scratch with a level's masks fixed
   (pruned entries 0, the rest 1, none trained): ``e2vpt.pruned_tokens`` /
   ``e2vpt.pruned_pieces``; the reference picks the (token, piece) level pair
   with the best validation accuracy and runs it with 5 seeds.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vpt_jax.methods import base

MASK_PARAMS = r"e2vpt_masks/.*"
PERCENTS = (10, 20, 30, 40, 50, 60, 70, 80, 90)
MIN_TOKENS, MIN_PIECES = 1, 4  # the reference's MIN_NUMBER_CLS_TOKEN(_PIECE)


def expand_masks(token_mask, piece_mask, width: int):
  """t (N,), s (N, pieces) -> the (N, width) multiplier t[n] * s[n, d mod pieces]."""
  pieces = piece_mask.shape[-1]
  if width % pieces:
    raise ValueError(f"e2vpt.pieces={pieces} must divide the width {width}")
  return token_mask[:, None] * jnp.tile(piece_mask, (1, width // pieces))


def fixed_masks(num_prompts: int, pieces: int, pruned_tokens: Sequence[int],
                pruned_pieces: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """The rewinding's constant masks: 0 at the pruned tokens and (token, piece) pairs."""
  tokens = np.ones((num_prompts,), np.float32)
  tokens[list(pruned_tokens)] = 0.0
  piece_mask = np.ones((num_prompts, pieces), np.float32)
  for token, piece in pruned_pieces:
    piece_mask[token, piece] = 0.0
  return tokens, piece_mask


class PromptMasks(nn.Module):
  """The pruning phase's learnable masks, multiplied onto prompts (S, B, N, D)."""
  pieces: int

  @nn.compact
  def __call__(self, prompts):
    num_prompts, width = prompts.shape[-2:]
    tokens = self.param("tokens", nn.initializers.ones, (num_prompts,))
    piece_mask = self.param("pieces", nn.initializers.ones, (num_prompts, self.pieces))
    return prompts * expand_masks(tokens, piece_mask, width).astype(prompts.dtype)


def mask_importance(model: nn.Module, params: Mapping, batches: Iterable) -> tuple:
  """(token scores (N,), piece scores (N, pieces)): mean d loss / d mask over batches.

  ``batches`` yields (normalised images (B, H, W, 3), labels (B,)); eval mode,
  mean softmax cross-entropy per batch, as the reference's trainer.
  """
  def loss(masks, images, labels):
    logits = model.apply({"params": {**params, "e2vpt_masks": masks}}, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()

  gradient = jax.jit(jax.grad(loss))
  totals, count = None, 0
  for images, labels in batches:
    grads = jax.device_get(gradient(params["e2vpt_masks"], images, labels))
    totals = grads if totals is None else jax.tree.map(np.add, totals, grads)
    count += 1
  if not count:
    base.fail("E2VPT's mask importance needs at least one training batch")
  return (np.asarray(totals["tokens"]) / count, np.asarray(totals["pieces"]) / count)


def prune_counts(total: int, minimum: int, percents: Sequence[int] = PERCENTS) -> list[int]:
  """How many entries each level prunes (the reference's ``determine_mask_sequence``)."""
  counts = []
  for percent in percents:
    count = int(total * percent / 100)
    if minimum > 0 and count > total - minimum:
      counts.append(total - minimum)
      break
    counts.append(count)
  return sorted(counts)


def lowest(scores: np.ndarray, count: int) -> list[int]:
  """The ``count`` indices of lowest score (ties in index order), sorted."""
  return sorted(int(i) for i in np.argsort(np.asarray(scores), kind="stable")[:count])


def pruning_levels(token_scores: np.ndarray, piece_scores: np.ndarray,
                   percents: Sequence[int] = PERCENTS) -> tuple[list, list]:
  """Per level, the pruned tokens [i, ...] and the pruned pieces [[token, piece], ...].

  One level per distinct count (the reference names its mask files by count).
  """
  num_tokens, pieces = piece_scores.shape
  token_levels = [lowest(token_scores, count)
                  for count in sorted(set(prune_counts(num_tokens, MIN_TOKENS, percents)))]
  piece_levels = [[[token, piece] for token in range(num_tokens)
                   for piece in lowest(piece_scores[token], count)]
                  for count in sorted(set(prune_counts(pieces, MIN_PIECES, percents)))]
  return token_levels, piece_levels


def parse_pruned_pieces(text: str) -> list[list[int]]:
  """"0:1 5;2:3" -> [[0, 1], [0, 5], [2, 3]] (token: pieces, tokens separated by ';')."""
  pairs = []
  for group in filter(None, (part.strip() for part in str(text).split(";"))):
    token, sep, pieces = group.partition(":")
    if not sep:
      base.fail(f"e2vpt.pruned_pieces group {group!r} must read token:piece piece ...")
    pairs += [[int(token), int(piece)] for piece in pieces.split()]
  return pairs
