"""Builds the model a config describes (one place, used by training and export)."""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from vpt_jax.models import methods as methods_lib
from vpt_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_spec(config) -> dict[str, Any]:
  """The JSON-serialisable description of a model: enough to rebuild it.

  Args:
    config: the run config (uses ``method``, ``model`` and ``prompt``) or a
      mapping previously returned by this function.
  """
  if "variant" in config:  # already a spec
    return dict(config)
  method = methods_lib.get_method(config.method)
  spec = dict(
      method=method.name,
      variant=config.model.variant,
      image_size=int(config.model.image_size),
      dropout_rate=float(config.model.dropout_rate),
      skip_dead_work=bool(config.model.skip_dead_work),
      dtype=str(config.model.dtype),
      num_prompts=0, prompt_dropout=0.0, prompt_projection=-1,
      pool=str(config.prompt.pool))
  if method.uses_prompts:
    spec.update(num_prompts=int(config.prompt.num_prompts),
                prompt_dropout=float(config.prompt.dropout),
                prompt_projection=int(config.prompt.projection))
  return spec


def validate_spec(spec: Mapping[str, Any]) -> None:
  """Fails fast, before any compute, on inconsistent model settings."""
  method = methods_lib.get_method(spec["method"])
  _, patch = vit.decode_variant(spec["variant"])
  if spec["image_size"] < patch or spec["image_size"] % patch:
    raise ValueError(
        f"image size {spec['image_size']} is not divisible by the patch size {patch} of "
        f"{spec['variant']}; use e.g. {max(patch, spec['image_size'] // patch * patch)}")
  if method.uses_prompts and spec["num_prompts"] < 1:
    raise ValueError(f"method {method.name} needs prompt.num_prompts >= 1, got "
                     f"{spec['num_prompts']}")
  if spec["pool"] not in vit.POOL_TYPES:
    raise ValueError(f"Unknown pool {spec['pool']!r}; choose one of {vit.POOL_TYPES}")
  if spec["dtype"] not in DTYPES:
    raise ValueError(f"Unknown dtype {spec['dtype']!r}; choose one of {sorted(DTYPES)}")


def build_model(spec: Mapping[str, Any], num_classes: int) -> vit.VisionTransformer:
  """The Linen module for a spec (see ``model_spec``)."""
  validate_spec(spec)
  method = methods_lib.get_method(spec["method"])
  return vit.VisionTransformer(
      num_classes=num_classes,
      variant=spec["variant"],
      dropout_rate=spec["dropout_rate"],
      backbone_dropout=method.backbone_dropout,
      num_prompts=spec["num_prompts"],
      deep_prompts=method.deep_prompts,
      prompt_dropout=spec["prompt_dropout"],
      prompt_projection=spec["prompt_projection"],
      pool=spec["pool"],
      skip_dead_work=spec["skip_dead_work"],
      dtype=DTYPES[spec["dtype"]])


def trainable_rules(config) -> tuple[tuple[str, str], ...]:
  """The config's explicit rules, or the method's when none are given."""
  rules = tuple(tuple(r) for r in config.trainable_rules)
  return rules or methods_lib.get_method(config.method).trainable_rules
