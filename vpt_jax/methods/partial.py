"""Partial-k: the last k blocks and the final norm train, plus the head (AdamW).

Any k >= 1 works (``registry.get_method("partial-3")``); the paper's are
partial-1/2/4. The blocks come from the backbone family (``Method.rules``).
"""

from __future__ import annotations

from vpt_jax.methods import base

# The smallest k partial-k accepts.
SMALLEST_K = 1


def partial(k: int) -> base.Method:
  """Partial-k: the last k blocks and the final LayerNorm, plus the head (AdamW)."""
  return base.Method(f"partial-{k}", base.train_only(), last_blocks=k, optimizer="adamw",
                     description=f"Partial-{k}: the last {k} block(s), encoder_norm and the "
                                 "head", merge=base.nothing_to_fold)


METHODS = tuple(partial(k) for k in (1, 2, 4))
