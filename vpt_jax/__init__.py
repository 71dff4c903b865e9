"""vpt-jax: visual prompt tuning of frozen Vision Transformers in JAX/Flax."""

__version__ = "0.1.0"
