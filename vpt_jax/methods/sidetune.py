"""Side-tuning (Zhang et al., ECCV 2020) as the VPT reference's baseline (vpt.md 1.10).

A side CNN blended with the frozen backbone's pooled features by a learned
gate; parameters ``side/...``. The side CNN may start from its own ``.npz``
(``sidetune.checkpoint``, see ``load_side_network``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt_jax import errors
from vpt_jax.checkpoints import merge as merge_lib
from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.methods import base
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.params.trees import flatten

SIDE_PARAMS = r"side/.*"
# Side-network parameters that never come from the side network's own file.
SIDE_FRESH = (r"projection/.*", r"alpha")


class SideNetwork(nn.Module):
  """The side network and its gate.

  out = sigmoid(alpha) * backbone_features + (1 - sigmoid(alpha)) * side(images),
  alpha a learned scalar initialised to 0 (an even blend). side(x) is a small
  CNN (stride-2 3x3 convolutions ``conv_{i}`` with ReLU, then a global average
  pool) followed by a bias-free Dense(D) ``projection``. The reference's side
  network is torchvision's ImageNet AlexNet ``features`` + 6x6 pooling (9216 ->
  D projection); here the CNN is small and can start from its own ``.npz``
  (``load_side_network``), with the same gate, projection and bias.
  """
  widths: Sequence[int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, backbone_features):
    """images (B, H, W, 3), backbone_features (B, D) -> blended features (B, D)."""
    x = images
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype,
                          name=f"conv_{i}")(x))
    side = nn.Dense(backbone_features.shape[-1], use_bias=False, dtype=self.dtype,
                    name="projection")(x.mean(axis=(1, 2)))
    gate = jax.nn.sigmoid(self.param("alpha", nn.initializers.zeros, ()))
    return gate * backbone_features + (1 - gate) * side.astype(backbone_features.dtype)


@dataclasses.dataclass(frozen=True)
class SideOptions(hooks_lib.Hooks):
  """Side-tuning: the channel widths of the side CNN's stride-2 3x3 convolutions."""
  widths: tuple[int, ...] = (32, 64, 128)

  reads_images = True

  def pooled_features(self, images, features, dtype):
    return SideNetwork(self.widths, dtype=dtype, name="side")(
        images, features).astype(jnp.float32)


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
    raise errors.UserError(f"sidetune.checkpoint={path!r} is set but the model has no side "
                           "network; use method=sidetune or clear the setting")
  side = merge_lib.merge_backbone(params["side"], npz_lib.read_npz(path), fresh=SIDE_FRESH,
                                source=path)
  return {**params, "side": side}


def save_side_network(params, path: str) -> None:
  """Writes the side CNN of ``params`` (without projection and gate) as an ``.npz``."""
  npz_lib.save_npz({k: v for k, v in flatten(params["side"]).items()
                    if not any(re.fullmatch(p, k) for p in SIDE_FRESH)}, path)


def _read_settings(config) -> base.Settings:
  return dict(widths=[int(w) for w in base.names(config.sidetune.widths)])


def _check_settings(settings: base.Settings, spec, geometry) -> None:
  del spec, geometry
  if not settings["widths"] or min(settings["widths"]) < 1:
    base.fail(f"sidetune.widths {settings['widths']} must be positive channel counts, "
              "e.g. '32,64,128'")


METHODS = (
    base.Method("sidetune", base.train_only(SIDE_PARAMS), fresh=(SIDE_PARAMS,),
                settings="sidetune",
                description="Side-tuning: a side CNN blended with the frozen features by "
                            "a learned gate, plus the head",
                read_settings=_read_settings, settings_check=_check_settings,
                # JSON turns tuples into lists; hook objects must stay hashable.
                make_hooks=lambda spec: SideOptions(tuple(spec["sidetune"]["widths"]))),
)
