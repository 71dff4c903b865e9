"""Bias (BitFit): every bias vector trains, plus the head (AdamW)."""

from __future__ import annotations

from vpt_jax.methods import base

METHODS = (
    base.Method("bias", base.train_only(base.BIAS_PARAMS), optimizer="adamw",
                description="Bias (BitFit): every bias vector, LayerNorm and patch "
                            "embedding biases included, plus the head",
                merge=base.nothing_to_fold),
)
