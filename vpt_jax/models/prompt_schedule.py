"""Where VPT's prompt sets enter the ViT encoder, block by block (``hooks.PromptPlan``).

The VPT reference runs its location and depth ablations through
``src/models/vit_prompt/vit_ablations.py`` (KMnP/vpt); ``schedule`` turns a
``PromptPlan`` into what the encoder does before each block, as that code does:

* prepend, deep in every block (the default VPT-deep): set 0 is inserted
  after CLS before block 0, set l replaces the previous block's prompt
  outputs before block l;
* prepend in the first k blocks (``NUM_DEEP_LAYERS``): after block k - 1 the
  prompt outputs travel on through the later blocks as ordinary tokens;
* ``FORWARD_DEEP_NOEXPAND``: they leave the sequence before block k instead;
* ``REVERSE_DEEP`` (the last k blocks): the first set *overwrites* the k-th..
  tokens after CLS, i.e. drops P patch tokens (the reference's
  ``forward_reverse_deep_prompt`` slices ``hidden[:, 1 + P:]`` although no
  prompt was inserted before; we follow the code);
* add / add-1: the set is added to every token before its block.

With ``skip_dead_work`` a prepended set whose outputs the next block discards
enters its block as keys and values only (``Encoder1DBlock``'s ``kv_only``),
which is exact.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax.numpy as jnp

from vpt_jax.models import hooks as hooks_lib

LOCATIONS = ("prepend", "add")


class BlockPrompts(NamedTuple):
  """What happens to the stream before one block.

  drop_rows: remove the P tokens after CLS (old prompt outputs, or patches
    for REVERSE_DEEP's first set).
  set_index: the prompt set that enters (None = none).
  how: "insert" (after CLS, in the sequence), "kv" (keys and values only)
    or "add" (added to every token).
  """
  drop_rows: bool = False
  set_index: Optional[int] = None
  how: str = ""


def schedule(plan: hooks_lib.PromptPlan, num_sets: int, depth: int, *,
             outputs_read: bool, skip_dead_work: bool) -> tuple[BlockPrompts, ...]:
  """One ``BlockPrompts`` per block.

  Args:
    plan: the method's ``PromptPlan``.
    num_sets: S, the leading size of the prompt array.
    depth: the number of blocks.
    outputs_read: the pooling reads the last block's prompt outputs.
    skip_dead_work: prompts whose outputs are discarded go in as keys and
      values only (else they travel in the sequence).

  Raises:
    ValueError: a plan that does not fit S or the depth.
  """
  if plan.location not in LOCATIONS:
    raise ValueError(f"Unknown prompt location {plan.location!r}; choose one of {LOCATIONS}")
  if not num_sets:  # no token prompts (none at all, or pixel-space ones)
    return tuple(BlockPrompts() for _ in range(depth))
  layers = tuple(range(num_sets)) if plan.layers is None else tuple(plan.layers)
  if len(layers) != num_sets or any(not 0 <= l < depth for l in layers) or (
      list(layers) != sorted(set(layers))):
    raise ValueError(f"prompt layers {layers} do not fit {num_sets} sets and {depth} blocks")
  entering = {layer: index for index, layer in enumerate(layers)}
  steps, in_sequence, first = [], False, True
  for layer in range(depth):
    index = entering.get(layer)
    if plan.location == "add":
      steps.append(BlockPrompts(set_index=index, how="add" if index is not None else ""))
      continue
    drop = in_sequence and (layer == plan.remove_at or index is not None)
    drop = drop or (index is not None and first and plan.first_replaces)
    in_sequence = in_sequence and not drop
    how = ""
    if index is not None:
      first = False
      following = layer + 1
      needed = (not skip_dead_work
                or (following < depth and following not in entering
                    and following != plan.remove_at)
                or (following == depth and outputs_read))
      how = "insert" if needed else "kv"
      in_sequence = needed
    steps.append(BlockPrompts(drop, index, how))
  return tuple(steps)


def apply(x, step: BlockPrompts, prompts, num_prompts: int, prefix: int = 1):
  """The stream (B, T, D) before a block and its kv-only tokens (B, P, D) or None.

  Prompts sit after the ``prefix`` tokens: CLS (1), CLS and registers
  (DINOv2's 1 + R) or none (SigLIP, 0).
  """
  if step.drop_rows:
    x = jnp.concatenate([x[:, :prefix], x[:, prefix + num_prompts:]], axis=1)
  if step.set_index is None:
    return x, None
  inserted = prompts[step.set_index]
  if step.how == "add":
    return x + inserted, None
  if step.how == "kv":
    return x, inserted
  return jnp.concatenate([x[:, :prefix], inserted, x[:, prefix:]], axis=1), None

