"""Builds the model a config describes (one place, used by training and export).

``model_spec(config)`` turns the config's method and its settings section
(``config.cvpt``, ``config.adapter``, ...) into a JSON-serialisable spec;
``build_model(spec, num_classes)`` builds the Linen module from it, so an
export's ``task.json`` rebuilds exactly the model that was trained.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.checkpoints.trees import flatten
from vpt_jax.models import heads
from vpt_jax.models import methods as methods_lib
from vpt_jax.models import prompts as prompts_lib
from vpt_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Spec section -> the VisionTransformer attribute and options class it fills.
OPTIONS = {
    "cvpt": ("cvpt_options", vit.CvptOptions),
    "e2vpt": ("e2vpt_options", vit.E2vptOptions),
    "vfpt": ("vfpt_options", vit.VfptOptions),
    "adapter": ("adapter_options", vit.AdapterOptions),
    "lora": ("lora_options", vit.LoraOptions),
    "sidetune": ("side_options", vit.SideOptions),
}
# Side-network parameters that never come from the side network's own file.
SIDE_FRESH = (r"projection/.*", r"alpha")


def _names(text: str) -> list[str]:
  """"query, value" -> ["query", "value"]."""
  return [part.strip() for part in str(text).split(",") if part.strip()]


def method_settings(method: methods_lib.Method, config) -> Optional[dict[str, Any]]:
  """The spec section of a method's settings, read from its config section."""
  name = method.settings
  if not name:
    return None
  section = config[name]
  if name == "cvpt":
    # m and the prompt dropout are the shared prompt fields (config.prompt).
    return dict(num_prompts=int(config.prompt.num_prompts), insert=int(section.insert),
                dropout=float(config.prompt.dropout), drop_path=float(section.drop_path))
  if name == "mlp":
    return dict(dropout=float(section.dropout))
  if name == "adapter":
    return dict(reduction=int(section.reduction), init=str(section.init))
  if name == "lora":
    return dict(rank=int(section.rank), alpha=float(section.alpha),
                targets=_names(section.targets))
  if name == "vfpt":
    return dict(percentage=float(section.percentage), dimension=str(section.dimension))
  if name == "e2vpt":
    return dict(num_prompts=int(section.kv_prompts), dropout=float(section.kv_dropout))
  if name == "sidetune":
    return dict(widths=[int(w) for w in _names(section.widths)])
  raise ValueError(f"method {method.name} names an unknown settings section {name!r}")


def model_spec(config) -> dict[str, Any]:
  """The JSON-serialisable description of a model: enough to rebuild it.

  Args:
    config: the run config (uses ``method``, ``model``, ``prompt`` and the
      method's settings section) or a mapping previously returned by this
      function.
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
  settings = method_settings(method, config)
  if settings is not None:
    spec[method.settings] = settings
  return spec


def _fail(message: str):
  raise ValueError(message)


def _validate_settings(method: methods_lib.Method, spec: Mapping[str, Any]) -> None:
  """Checks the method's settings section against the model."""
  size, _ = vit.decode_variant(spec["variant"])
  settings = spec.get(method.settings) or {}
  if method.settings and method.settings != "mlp" and not settings:
    _fail(f"spec of method {method.name} lacks its {method.settings!r} settings")
  name = method.settings
  if name == "cvpt":
    if settings["num_prompts"] < 1:
      _fail(f"cvpt needs prompt.num_prompts >= 1, got {settings['num_prompts']}")
    if settings["insert"] not in vit.CVPT_INSERTS:
      _fail(f"cvpt.insert must be one of {vit.CVPT_INSERTS} (3 is the reference's), got "
            f"{settings['insert']}")
  elif name == "adapter":
    if settings["init"] not in vit.ADAPTER_INITS:
      _fail(f"Unknown adapter.init {settings['init']!r}; choose one of {vit.ADAPTER_INITS}")
    if not 1 <= settings["reduction"] <= size.width:
      _fail(f"adapter.reduction {settings['reduction']} leaves no bottleneck for width "
            f"{size.width}; the paper uses 8, 64 or 256")
  elif name == "lora":
    unknown = sorted(set(settings["targets"]) - set(vit.LORA_TARGETS))
    if unknown or not settings["targets"]:
      _fail(f"lora.targets {settings['targets']} must be a non-empty comma-separated subset "
            f"of {', '.join(vit.LORA_TARGETS)}")
    if settings["rank"] < 1:
      _fail(f"lora.rank must be >= 1, got {settings['rank']}")
  elif name == "vfpt":
    if settings["dimension"] not in prompts_lib.FOURIER_DIMENSIONS:
      _fail(f"Unknown vfpt.dimension {settings['dimension']!r}; choose one of "
            f"{prompts_lib.FOURIER_DIMENSIONS}")
    if math.floor(spec["num_prompts"] * settings["percentage"]) < 1 or settings["percentage"] > 1:
      _fail(f"vfpt.percentage {settings['percentage']} of {spec['num_prompts']} prompts "
            "Fourier-transforms no prompt (or more than all); use a value in (0, 1] with "
            "floor(num_prompts * percentage) >= 1")
  elif name == "e2vpt":
    if settings["num_prompts"] < 1:
      _fail(f"e2vpt.kv_prompts must be >= 1, got {settings['num_prompts']}")
  elif name == "sidetune":
    if not settings["widths"] or min(settings["widths"]) < 1:
      _fail(f"sidetune.widths {settings['widths']} must be positive channel counts, "
            "e.g. '32,64,128'")
  method.rules(size.depth)  # partial-k: k <= depth


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
  if method.head_init not in heads.HEAD_INITS:
    raise ValueError(f"method {method.name} has an unknown head init {method.head_init!r}")
  _validate_settings(method, spec)


def build_model(spec: Mapping[str, Any], num_classes: int) -> vit.VisionTransformer:
  """The Linen module for a spec (see ``model_spec``)."""
  validate_spec(spec)
  method = methods_lib.get_method(spec["method"])
  options = {}
  if method.settings in OPTIONS:
    attribute, options_class = OPTIONS[method.settings]
    # JSON turns tuples into lists; options must stay hashable.
    options[attribute] = options_class(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in spec[method.settings].items()})
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
      head_hidden_layers=method.head_hidden_layers,
      head_dropout=(spec.get("mlp") or {}).get("dropout", 0.1),
      head_init=method.head_init,
      dtype=DTYPES[spec["dtype"]],
      **options)


def init_variables(model: vit.VisionTransformer, image_size: int, seed: int,
                   out_shardings=None) -> dict:
  """``model.init`` under jit: {"params": ..., and "batch_stats" if the model has them}."""
  init_fn = lambda: model.init(jax.random.key(seed),
                               jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  return dict(jax.jit(init_fn, out_shardings=out_shardings)())


def variable_shapes(model: vit.VisionTransformer, image_size: int) -> dict:
  """The variables of ``init_variables`` as ShapeDtypeStructs, without computing them."""
  return dict(jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((1, image_size, image_size, 3), jnp.float32)))


def load_side_network(params, path: str) -> dict:
  """Puts a side-network checkpoint into ``params["side"]``, strictly.

  The file holds the side CNN's convolutions with the model's names relative to
  ``side/`` (``conv_{i}/kernel``, ``conv_{i}/bias``), as ``save_side_network``
  writes them; the projection and the gate stay at their initialisation.

  Raises:
    ValueError: the model has no side network.
    npz.CheckpointError: unreadable file or a key/shape mismatch (listed).
  """
  if "side" not in params:
    raise ValueError(f"sidetune.checkpoint={path!r} is set but the model has no side "
                     "network; use method=sidetune or clear the setting")
  side = npz_lib.merge_backbone(params["side"], npz_lib.read_npz(path), fresh=SIDE_FRESH,
                                source=path)
  return {**params, "side": side}


def save_side_network(params, path: str) -> None:
  """Writes the side CNN of ``params`` (without projection and gate) as an ``.npz``."""
  npz_lib.save_npz({k: v for k, v in flatten(params["side"]).items()
                    if not any(re.fullmatch(p, k) for p in SIDE_FRESH)}, path)


def load_pretrained(params, spec: Mapping[str, Any], backbone_path: str = "",
                    side_checkpoint: str = "") -> dict:
  """The backbone file (everything but the method's fresh parameters), then the side CNN."""
  if backbone_path:
    params = npz_lib.load_backbone(
        params, backbone_path, fresh=methods_lib.get_method(spec["method"]).fresh_patterns)
  if side_checkpoint:
    params = load_side_network(params, side_checkpoint)
  return params


def trainable_rules(config) -> tuple[tuple[str, str], ...]:
  """The config's explicit rules, or the method's for the config's backbone depth."""
  rules = tuple(tuple(r) for r in config.trainable_rules)
  if rules:
    return rules
  size, _ = vit.decode_variant(config.model.variant)
  return methods_lib.get_method(config.method).rules(size.depth)
