"""Flax Linen backbones, the hook points they offer methods (hooks.py), heads and prompt blocks."""
