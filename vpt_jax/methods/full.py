"""Full fine-tuning: every parameter trains, with AdamW and the backbone's dropout on."""

from __future__ import annotations

from vpt_jax.methods import base
from vpt_jax.params.freezing import TRAIN

METHODS = (
    base.Method("full", ((r".*", TRAIN),), backbone_dropout=True, optimizer="adamw",
                description="Full fine-tuning: every parameter trains (AdamW, dropout on)",
                merge=base.nothing_to_fold),
)
