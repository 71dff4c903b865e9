"""Flax Linen models: the ViT backbone, prompts and heads."""
