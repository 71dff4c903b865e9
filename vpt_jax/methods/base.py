"""What an adaptation method declares (``Method``) and the parameter names methods share.

A method says which parameters train (ordered ``(regex, label)`` rules over
the ``/``-joined parameter path, first match wins), which parameters are its
own and therefore freshly initialised rather than read from the backbone file
(``fresh``), whether the backbone runs in training mode (dropout) while
tuning, its default optimizer, its head, which config section holds its
settings and how that section becomes the model spec (``read_settings``) and
the backbone's hook object (``make_hooks``, see ``models.hooks``), exactly as
the VPT reference's ``MODEL.TRANSFER_TYPE`` table does (vpt.md 1.5, 2) for
its baselines. ``registry`` lists the methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

from vpt_jax import errors
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.params.freezing import FROZEN, TRAIN

# The method parameters' names (regexes, fully matched against "/"-joined paths).
HEAD_PARAMS = r"head/.*"
VPT_PARAMS = r"vpt/.*"
# Every bias vector: attention q/k/v/out, MLP, LayerNorms (encoder_norm too),
# the patch embedding; the head's are covered by the head rule (bias, vpt+bias).
BIAS_PARAMS = r"(.*/)?bias"

Settings = dict[str, Any]


def no_hooks(spec: Mapping[str, Any]) -> hooks_lib.Hooks:
  """The hook object of a method that adds nothing to the backbone."""
  del spec
  return hooks_lib.NO_HOOKS


def no_settings_check(settings: Settings, spec: Mapping[str, Any],
                      geometry: hooks_lib.Geometry) -> None:
  """Accepts any settings (methods without checks of their own)."""
  del settings, spec, geometry


def nothing_to_fold(spec: Mapping[str, Any], flat: dict) -> dict:
  """The merge of a method that trains backbone parameters only: they already are the ViT's."""
  del spec
  return dict(flat)


def fail(message: str):
  """Raises the refusal a settings check reports: a ``UserError`` (one line on the
  command line), since settings are the user's input."""
  raise errors.UserError(message)


def names(text: str) -> list[str]:
  """"query, value" -> ["query", "value"] (comma-separated config values)."""
  return [part.strip() for part in str(text).split(",") if part.strip()]


@dataclasses.dataclass(frozen=True)
class Method:
  """What one method trains, what it adds and how the backbone behaves.

  Attributes:
    name: the ``config.method`` value.
    trainable_rules: ordered (regex, label) rules; ``rules(blocks, final_norm)``
      adds partial-k's rules, which need the backbone's block names.
    fresh: regexes of the method's own parameters (besides the head, which is
      always fresh): initialised, never read from the backbone file.
    uses_prompts, deep_prompts: VPT prompts in the sequence (shallow or deep).
    backbone_dropout: backbone in train mode (dropout) while tuning.
    optimizer: default ``optim.name``.
    settings: the config section with the method's options ("" = none), also
      its key in the model spec.
    settings_required: whether a spec must hold the section (MLP-k's is
      optional: specs written before it had one use the default dropout).
    head_hidden_layers: k - 1 for MLP-k.
    last_blocks: k for partial-k.
    head_init: "vpt" or "torch_default" (see ``heads``).
    description: one line for listings.
    read_settings: config -> the spec section (JSON values), None = no section.
    check_settings: (spec section, spec, backbone geometry) -> None; raises
      ValueError naming the setting and the fix.
    make_hooks: spec -> the ``hooks.Hooks`` the method adds to a ViT.
    merge: (spec, flat params) -> the flat params of the plain ViT with the
      method's update folded into the backbone weights (float64), its own
      parameters gone; None = its change is not linear in the weights, so it
      cannot merge (``export.merging``).
  """
  name: str
  trainable_rules: tuple[tuple[str, str], ...]
  fresh: tuple[str, ...] = ()
  uses_prompts: bool = False
  deep_prompts: bool = False
  backbone_dropout: bool = False
  optimizer: str = "sgd"
  settings: str = ""
  settings_required: bool = True
  head_hidden_layers: int = 0
  last_blocks: int = 0
  head_init: str = "vpt"
  description: str = ""
  read_settings: Optional[Callable[[Any], Settings]] = None
  settings_check: Callable[[Settings, Mapping[str, Any], hooks_lib.Geometry], None] = (
      no_settings_check)
  make_hooks: Callable[[Mapping[str, Any]], hooks_lib.Hooks] = no_hooks
  merge: Optional[Callable[[Mapping[str, Any], dict], dict]] = None

  @property
  def fresh_patterns(self) -> tuple[str, ...]:
    """Regexes of every parameter not loaded from the backbone file."""
    return (HEAD_PARAMS,) + self.fresh

  def rules(self, block_patterns=(), final_norm: str = "") -> tuple[tuple[str, str], ...]:
    """The trainable rules on a backbone with these blocks (see ``backbones.Family``).

    Args:
      block_patterns: regexes of every block's parameters, in forward order.
      final_norm: regex of the parameters after the last block (partial-k).

    Raises:
      ValueError: partial-k with k larger than the number of blocks.
    """
    if not self.last_blocks:
      return self.trainable_rules
    depth = len(block_patterns)
    if self.last_blocks > depth:
      raise errors.UserError(f"{self.name} tunes the last {self.last_blocks} blocks but the model "
                             f"has {depth}; use partial-k with k <= {depth}, or 'full'")
    blocks = "|".join(block_patterns[depth - self.last_blocks:])
    return ((rf"({blocks})/.*", TRAIN), (final_norm, TRAIN)) + self.trainable_rules

  def spec_settings(self, config) -> Optional[Settings]:
    """The spec section of the method's settings, read from the run config."""
    return None if self.read_settings is None else self.read_settings(config)

  def check_settings(self, spec: Mapping[str, Any], geometry: hooks_lib.Geometry) -> None:
    """Checks the method's spec section against a backbone of this geometry.

    Raises:
      ValueError: the section is missing or a setting does not fit.
    """
    settings = spec.get(self.settings) or {}
    if self.settings and self.settings_required and not settings:
      fail(f"spec of method {self.name} lacks its {self.settings!r} settings")
    self.settings_check(settings, spec, geometry)

  def hooks(self, spec: Mapping[str, Any]) -> hooks_lib.Hooks:
    """The hook object the method adds to a backbone built from ``spec``."""
    return self.make_hooks(spec)


def train_only(*trained: str) -> tuple[tuple[str, str], ...]:
  """Train the given patterns and the head; freeze everything else."""
  return tuple((pattern, TRAIN) for pattern in trained) + ((HEAD_PARAMS, TRAIN), (r".*", FROZEN))
