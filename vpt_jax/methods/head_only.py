"""Head-only methods on the frozen backbone's features (SGD): Linear and MLP-k.

MLP-k puts k - 1 hidden Dense-ReLU-BatchNorm-Dropout layers in front of the
output layer (``heads.Head``); any k >= 2 works (``registry.get_method``),
the paper's are mlp-2/3/5/9. Its dropout is the ``mlp`` config section.
"""

from __future__ import annotations

from vpt_jax.methods import base

# The smallest k MLP-k accepts (one hidden layer).
SMALLEST_K = 2


def _read_mlp_settings(config) -> base.Settings:
  return dict(dropout=float(config.mlp.dropout))


def mlp(k: int) -> base.Method:
  """MLP-k: a head of k - 1 hidden layers on the frozen backbone's features (SGD)."""
  return base.Method(f"mlp-{k}", base.train_only(), head_hidden_layers=k - 1, settings="mlp",
                     settings_required=False, read_settings=_read_mlp_settings,
                     description=f"MLP-{k}: {k - 1} hidden Dense-ReLU-BatchNorm-Dropout "
                                 "layer(s) and the output layer")


METHODS = (
    base.Method("linear", base.train_only(),
                description="Linear probe: only the head trains", merge=base.nothing_to_fold),
    *(mlp(k) for k in (2, 3, 5, 9)),
)
