"""Strictly merging checkpoint arrays (in model names) into a model's parameter tree.

``merge_backbone`` takes every parameter of the model from the file except the
``fresh`` ones (prompts, heads, adapters, ... keep their initialisation), casts
to the model's dtypes, resamples a ViT position embedding whose token count
differs, and otherwise refuses: every missing key, unexpected key and shape
mismatch is listed at once, sorted, with a hint at the likely cause (a wrong
variant, a parameter that belongs in ``fresh=`` or ``ignore=``).

Nothing here imports the model: the merge works on nested dicts of arrays, so
any module that follows the naming loads, and new modules are declared
``fresh`` by the caller.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vpt_jax import errors
from vpt_jax.checkpoints.npz import CheckpointMismatchError
from vpt_jax.checkpoints.npz import PositionEmbeddingError
from vpt_jax.checkpoints.vit_layouts import POSEMB_KEY
from vpt_jax.checkpoints.vit_layouts import resample_posemb
from vpt_jax.params.trees import flatten, unflatten

__all__ = ["DEFAULT_FRESH", "merge_backbone"]

# Parameters that never come from a backbone file unless the caller says otherwise.
DEFAULT_FRESH = (r"head/.*", r"vpt/.*")

logger = logging.getLogger(__name__)


def _compile_patterns(patterns: Sequence[str], argument: str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    patterns = (patterns,)
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise errors.UserError(f"invalid regex {pattern!r} in {argument}=: {e}") from e
  return compiled


def _matches(patterns: Sequence[re.Pattern], key: str) -> bool:
  return any(pattern.fullmatch(key) for pattern in patterns)


def _architecture(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Width/depth/etc. implied by ViT parameter shapes (entries only when found)."""
  shape = lambda key: tuple(np.shape(flat[key])) if key in flat else None
  arch: dict[str, Any] = {}
  if (kernel := shape("embedding/kernel")) and len(kernel) == 4:
    arch["width"] = kernel[3]
    arch["patch"] = f"{kernel[0]}x{kernel[1]}"
  blocks = {int(m.group(1)) for key in flat
            if (m := re.match(r"Transformer/encoderblock_(\d+)/", key))}
  if blocks:
    arch["depth"] = max(blocks) + 1
  query = shape("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
  if query and len(query) == 3:
    arch["heads"] = query[1]
  mlp = shape("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel")
  if mlp and len(mlp) == 2:
    arch["mlp_dim"] = mlp[1]
  if (posemb := shape(POSEMB_KEY)) and len(posemb) == 3:
    arch["tokens"] = posemb[1]
  return arch


def _format_arch(arch: Mapping[str, Any]) -> str:
  return ", ".join(f"{name} {value}" for name, value in arch.items()) or "unknown"


def _mismatch_message(source: str, missing, unexpected, mismatched, file_flat,
                      model_flat, has_cls: bool) -> str:
  lines = [f"Checkpoint {source} does not match the model's parameters:"]
  if missing:
    lines.append(f"  missing from the file ({len(missing)}):")
    lines += [f"    {key}" for key in missing]
  if unexpected:
    lines.append(f"  in the file but not in the model ({len(unexpected)}):")
    lines += [f"    {key}" for key in unexpected]
  if mismatched:
    lines.append(f"  shape mismatches ({len(mismatched)}):")
    lines += [f"    {key}: file {file_shape} vs model {model_shape}"
              + (f" ({reason})" if reason else "")
              for key, file_shape, model_shape, reason in mismatched]
  file_arch, model_arch = _architecture(file_flat), _architecture(model_flat)
  file_arch.pop("tokens", None)  # the token count is resampled, not a mismatch
  model_arch.pop("tokens", None)
  hints = []
  if file_arch != model_arch:
    hints.append(f"wrong variant? The file implies {_format_arch(file_arch)}; the "
                 f"model has {_format_arch(model_arch)}.")
  if has_cls and "cls" in missing:
    hints.append("The file has no class token (a big_vision model trained with "
                 "pool_type 'gap' or 'map'?); this model needs a 'tok' model.")
  if missing:
    hints.append("A file for this --config.model.variant holds every backbone parameter "
                 "(from Python, merge_backbone(fresh=...) starts named ones from their "
                 "initialisation).")
  if unexpected:
    hints.append("The file holds parameters this model lacks: check "
                 "--config.model.variant and the file (from Python, "
                 "merge_backbone(ignore=...) drops named ones).")
  if not hints:
    hints.append("Check the model configuration (variant, image size) against "
                 "the checkpoint.")
  lines.append("Hint: " + " ".join(hints))
  return "\n".join(lines)


def _fit_to_model(key: str, value: np.ndarray, want: tuple[int, ...],
                  has_cls: bool) -> tuple[Any, str]:
  """(the file's array in the model's shape ``want``, "") or (None, why it is not).

  Only a position embedding whose token count alone differs is reshaped: it
  is resampled (with a class-token row when the model has ``cls``).
  """
  if value.shape == want:
    return value, ""
  posemb_resizable = (key.endswith("pos_embedding") and value.ndim == 3
                      and len(want) == 3 and value.shape[::2] == want[::2])
  if not posemb_resizable:
    return None, ""
  try:
    resampled = resample_posemb(value, want[1], has_class_token=has_cls)
  except PositionEmbeddingError:
    extra = int(has_cls)
    return None, (f"cannot resample: {value.shape[1] - extra} and "
                  f"{want[1] - extra} patch tokens must both be square grids")
  logger.info("Resampled %s from %s to %s", key, value.shape, want)
  return resampled, ""


def merge_backbone(init_params: Mapping[str, Any], file_params: Mapping[str, Any], *,
                   fresh: Sequence[str] = DEFAULT_FRESH, ignore: Sequence[str] = (),
                   source: str = "<arrays>") -> dict[str, Any]:
  """Puts checkpoint arrays (already in model layout) into a parameter tree.

  Args:
    init_params: nested params of the model (arrays or ShapeDtypeStructs); a
      Flax variables dict {"params": tree} is accepted and returned in kind.
    file_params: {model key: array}, e.g. from `to_model_layout`.
    fresh: regexes (re.fullmatch on `/`-joined paths) of model parameters that
      keep their init value; they are never read from the file, even if present,
      and file keys matching them are not reported as unexpected.
    ignore: regexes of file keys to drop silently (e.g. a big_vision MAPHead).
    source: how to name the checkpoint in error messages.

  Returns:
    A new nested dict shaped like ``init_params``: fresh leaves are the init
    values, every other leaf is the file's array (numpy, on the host) cast to the
    init leaf's dtype. The position embedding is resampled when only its token
    count differs (with a class-token row when the model has ``cls``).

  Raises:
    CheckpointMismatchError: listing every missing key, unexpected key and
      shape mismatch at once, sorted, with a hint.
  """
  wrapped = set(init_params) == {"params"} and isinstance(init_params["params"], Mapping)
  tree = init_params["params"] if wrapped else init_params
  fresh_patterns = _compile_patterns(fresh, "fresh")
  ignore_patterns = _compile_patterns(ignore, "ignore")
  model_flat = flatten(tree)
  file_flat = {key: value for key, value in file_params.items()
               if not _matches(ignore_patterns, key)}
  has_cls = "cls" in model_flat

  merged, missing, mismatched = _merged_leaves(model_flat, file_flat, fresh_patterns, has_cls)
  unexpected = sorted(key for key in file_flat
                      if key not in model_flat and not _matches(fresh_patterns, key))
  if missing or unexpected or mismatched:
    missing.sort()
    mismatched.sort(key=lambda item: item[0])
    raise CheckpointMismatchError(
        _mismatch_message(source, missing, unexpected, mismatched, file_flat,
                          model_flat, has_cls),
        missing, unexpected, [item[:3] for item in mismatched])
  result = unflatten(merged)
  return {"params": result} if wrapped else result


def _merged_leaves(model_flat: dict, file_flat: dict, fresh_patterns, has_cls: bool):
  """(merged {key: value}, missing keys, mismatched (key, file shape, want, reason)).

  Fresh keys keep their init value; every other model key takes the file's
  array, fitted to the model's shape where that is exact (posemb resampling)
  and cast to the init leaf's dtype.
  """
  merged, missing, mismatched = {}, [], []
  for key, init_value in model_flat.items():
    if _matches(fresh_patterns, key):
      merged[key] = init_value
      continue
    if key not in file_flat:
      missing.append(key)
      continue
    value = np.asarray(file_flat[key])
    want = tuple(np.shape(init_value))
    fitted, reason = _fit_to_model(key, value, want, has_cls)
    if fitted is None:
      mismatched.append((key, value.shape, want, reason))
      continue
    dtype = getattr(init_value, "dtype", None)
    dtype = np.result_type(init_value) if dtype is None else dtype
    merged[key] = np.array(fitted, dtype=dtype)
  return merged, missing, mismatched
