"""Builds the model a config describes (one place, used by training and export).

``model_spec(config)`` turns the config's method and its settings section
(``config.cvpt``, ``config.adapter``, ...; the method's ``read_settings``)
into a JSON-serialisable spec; ``build_model(spec, num_classes)`` builds the
Linen module from it with the backbone family and the method's hooks, so an
export's ``task.json`` rebuilds exactly the model that was trained. It lives
in the methods layer because it needs both the backbones and the methods.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from flax import linen as nn
import jax
import jax.numpy as jnp

from vpt_jax import errors
from vpt_jax.checkpoints import hub
from vpt_jax.checkpoints import merge as merge_lib
from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.checkpoints import vit_layouts
from vpt_jax.methods import prompt_ablations
from vpt_jax.methods import registry
from vpt_jax.methods import sidetune
from vpt_jax.models import attention_kernels
from vpt_jax.models import backbones
from vpt_jax.models import heads
from vpt_jax.models import vit
from vpt_jax.params.freezing import FROZEN

REMAT_MODES = vit.REMAT_MODES


def model_spec(config) -> dict[str, Any]:
  """The JSON-serialisable description of a model: enough to rebuild it.

  Args:
    config: the run config (uses ``method``, ``model``, ``prompt`` and the
      method's settings section) or a mapping previously returned by this
      function.
  """
  if "variant" in config:  # already a spec
    return dict(config)
  method = registry.get_method(config.method)
  spec = dict(
      method=method.name,
      variant=config.model.variant,
      image_size=int(config.model.image_size),
      dropout_rate=float(config.model.dropout_rate),
      skip_dead_work=bool(config.model.skip_dead_work),
      dtype=str(config.model.dtype),
      remat=str(config.model.remat),
      num_prompts=0, prompt_dropout=0.0, prompt_projection=-1,
      pool=str(config.prompt.pool))
  if method.uses_prompts:
    spec.update(num_prompts=int(config.prompt.num_prompts),
                prompt_dropout=float(config.prompt.dropout),
                prompt_projection=int(config.prompt.projection))
  if config.model.attention != "einsum":  # only when set, so earlier specs stay as they were
    spec["attention"] = str(config.model.attention)
  ablation = prompt_ablations.spec_section(config)
  if ablation is not None:  # VPT's ablations (only when some option is set)
    spec["prompt_ablation"] = ablation
  settings = method.spec_settings(config)
  if settings is not None:
    spec[method.settings] = settings
  return spec


def validate_spec(spec: Mapping[str, Any]) -> None:
  """Fails fast, before any compute, on inconsistent model settings."""
  method = registry.get_method(spec["method"])
  family = backbones.get_family(spec["variant"])
  family.check_method(method.name)
  if spec["image_size"] < 1:
    raise errors.UserError(f"model.image_size={spec['image_size']} must be a positive number "
                           "of pixels; set --config.model.image_size=224 (or the backbone's)")
  if method.uses_prompts and spec["num_prompts"] < 1:
    raise errors.UserError(f"method {method.name} needs prompt.num_prompts >= 1, got "
                           f"{spec['num_prompts']}")
  if spec["dtype"] not in backbones.DTYPES:
    raise errors.UserError(f"Unknown dtype {spec['dtype']!r}; choose one of "
                           f"{sorted(backbones.DTYPES)}")
  remat = spec.get("remat", "none")  # specs written before the field hold none
  if remat not in REMAT_MODES:
    raise errors.UserError(f"Unknown model.remat {remat!r}; choose one of {REMAT_MODES}")
  if remat != "none" and not family.supports_remat:
    raise errors.UserError(f"model.remat={remat!r} is not implemented for {family.name} backbones "
                           "(only for the ViT family); set --config.model.remat=none")
  _check_attention(spec.get("attention", "einsum"), family)  # older specs: einsum
  if method.head_init not in heads.HEAD_INITS:
    raise ValueError(f"method {method.name} has an unknown head init {method.head_init!r}")
  family.validate(spec, method)
  prompt_ablations.check(spec)
  method.rules(family.block_patterns(spec["variant"]), family.final_norm)  # partial-k: k <= depth


def _check_attention(kernel: str, family: backbones.Family) -> None:
  """``model.attention`` must be known, and not set for a backbone without attention."""
  attention_kernels.check_kernel(kernel)
  if kernel != "einsum" and not family.supports_attention_kernels:
    raise errors.UserError(f"model.attention={kernel!r} has no effect on {family.name} backbones "
                           "(no attention layers); set --config.model.attention=einsum")


def build_model(spec: Mapping[str, Any], num_classes: int):
  """The Linen module for a spec (see ``model_spec``), from its backbone family."""
  validate_spec(spec)
  method = registry.get_method(spec["method"])
  return backbones.get_family(spec["variant"]).build(spec, num_classes, method)


def init_variables(model: nn.Module, image_size: int, seed: int,
                   out_shardings=None, keep_params=None) -> dict:
  """``model.init`` under jit: {"params": ..., and "batch_stats" if the model has them}.

  ``keep_params``: a tree of bools shaped like the params; the leaves marked
  False come back as None and are never computed (XLA drops their random
  draws), the others hold exactly the values of a full init.
  """
  def init_fn():
    variables = dict(model.init(jax.random.key(seed),
                                jnp.zeros((1, image_size, image_size, 3), jnp.float32)))
    if keep_params is not None:
      variables["params"] = jax.tree.map(lambda keep, leaf: leaf if keep else None,
                                         keep_params, variables["params"])
    return variables
  return jax.jit(init_fn, out_shardings=out_shardings)()


def variable_shapes(model: nn.Module, image_size: int) -> dict:
  """The variables of ``init_variables`` as ShapeDtypeStructs, without computing them."""
  return dict(jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros((1, image_size, image_size, 3), jnp.float32)))


def read_checkpoint_arrays(path: str) -> dict:
  """A backbone file's arrays under the file's own names (``read_backbone_file`` converts them).

  PyTorch files (``backbones.TORCH_SUFFIXES``, a sharded ``*.index.json``) are
  read without executing pickled code, the others as ``.npz``; an ``hf://``
  reference is resolved through the hub's cache first (``checkpoints.hub``).
  """
  path = hub.local_path(path)
  if backbones.is_torch_file(path):
    from vpt_jax.checkpoints import torch_files  # pylint: disable=g-import-not-at-top
    return torch_files.read_state_dict(path)
  return npz_lib.read_npz(path)


def read_backbone_file(path: str, variant: str,
                       arrays: Optional[dict] = None) -> tuple[dict, str]:
  """A backbone checkpoint's arrays in the model's layout, and how to name it.

  ViT ``.npz`` files (vision_transformer, big_vision, ours) go through the
  layout detection of ``checkpoints.npz``, other families' ``.npz`` files hold
  the model's own names; PyTorch files are converted by the variant's family
  (MAE, MoCo v3, Swin, ConvNeXt, ResNet). ``arrays``: the file's
  ``read_checkpoint_arrays``, when the caller has read them already.
  """
  path = hub.local_path(path)
  family = backbones.get_family(variant)
  if backbones.is_torch_file(path) and family.convert_torch is None:
    raise npz_lib.CheckpointError(
        f"{path} looks like a PyTorch checkpoint, but {family.name} backbones load "
        ".npz files; convert it or pass the official .npz")
  arrays = read_checkpoint_arrays(path) if arrays is None else arrays
  if backbones.is_torch_file(path):
    return (family.convert_torch(arrays, variant),
            f"{path} (PyTorch, converted for {family.name})")
  if family.convert_npz is not None:
    return (family.convert_npz(arrays, variant),
            f"{path} (.npz, converted for {family.name})")
  if family.name != "vit":
    # Only ViTs have official .npz layouts; other families' .npz files are
    # ours (``save_npz`` of the model's own parameter names).
    return arrays, f"{path} ({family.name}, model layout)"
  return vit_layouts.model_layout(arrays, path)


def load_backbone_file(params, path: str, variant: str, fresh,
                       arrays: Optional[dict] = None) -> dict:
  """``params`` with everything but the ``fresh`` regexes read from ``path``, strictly.

  ``arrays``: the file's ``read_checkpoint_arrays``, when already read.
  """
  arrays, source = read_backbone_file(path, variant, arrays)
  return merge_lib.merge_backbone(params, arrays, fresh=fresh, source=source)


def load_pretrained(params, spec: Mapping[str, Any], backbone_path: str = "",
                    side_checkpoint: str = "", backbone_arrays: Optional[dict] = None) -> dict:
  """The backbone file (everything but the method's fresh parameters), then the side CNN.

  ``backbone_arrays``: the backbone file's ``read_checkpoint_arrays``, when already read.
  """
  if backbone_path:
    params = load_backbone_file(params, backbone_path, spec["variant"],
                                registry.get_method(spec["method"]).fresh_patterns,
                                backbone_arrays)
  if side_checkpoint:
    params = sidetune.load_side_network(params, side_checkpoint)
  return params


def trainable_rules(config) -> tuple[tuple[str, str], ...]:
  """The config's explicit rules, or the method's for the config's backbone depth."""
  rules = tuple(tuple(r) for r in config.trainable_rules)
  if rules:
    return rules
  family = backbones.get_family(config.model.variant)
  method_rules = registry.get_method(config.method).rules(
      family.block_patterns(config.model.variant), family.final_norm)
  return (tuple((pattern, FROZEN) for pattern in family.always_frozen)
          + prompt_ablations.extra_rules(model_spec(config)) + method_rules)
