"""Classification heads, initialised as the reference of each method does.

* VPT reference (Jia et al., ECCV 2022; KMnP/vpt ``src/models/mlp.py``, vpt.md
  1.4): the output layer's kernel is kaiming-normal fan-out (std sqrt(2 / C),
  untruncated) and its bias is the focal-loss prior -log((1 - 0.01) / 0.01).
  "MLP-k" puts k - 1 hidden layers in front of it, each
  Dense(D -> D) -> ReLU -> BatchNorm -> Dropout(0.1).
* CVPT reference (Huang et al., ICCV 2025; cvpt.md 1.6): ``reset_classifier``
  creates a PyTorch ``nn.Linear`` with its default init, kernel and bias both
  U(-1 / sqrt(D), 1 / sqrt(D)).

The output layer's parameters are always ``head/kernel`` and ``head/bias`` (so
the optimizer's "no decay on the head bias" rule and the checkpoints agree for
every head); hidden layers live under ``head/hidden_{i}`` and
``head/batchnorm_{i}``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from vpt_jax import errors
from vpt_jax.models import prompts as prompts_lib

# Focal-loss style prior: every class starts at probability 0.01.
HEAD_BIAS_INIT = -math.log((1 - 0.01) / 0.01)
HEAD_INITS = ("vpt", "torch_default")
# PyTorch BatchNorm1d defaults: running = 0.9 * running + 0.1 * batch, eps 1e-5.
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5


def torch_default_uniform(fan_in: int):
  """PyTorch nn.Linear's default init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return prompts_lib.uniform_symmetric(1.0 / math.sqrt(fan_in))


def _output_inits(init: str, fan_in: int):
  if init == "vpt":
    return (nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            nn.initializers.constant(HEAD_BIAS_INIT))
  if init == "torch_default":
    return torch_default_uniform(fan_in), torch_default_uniform(fan_in)
  raise errors.UserError(f"Unknown head init {init!r}; choose one of {HEAD_INITS}")


class Head(nn.Module):
  """The VPT reference's head: k - 1 hidden layers (MLP-k), then the output layer.

  Each hidden layer is ``h = Dropout(BatchNorm(ReLU(h W_i + b_i)))`` with W_i of
  shape (D, D) (kaiming-normal fan-out, bias PyTorch default), BatchNorm as
  PyTorch's BatchNorm1d (batch statistics while training, running averages in
  eval; momentum 0.1 in PyTorch's convention, eps 1e-5) and dropout 0.1. With
  ``hidden_layers=0`` (the default, "Linear") it is a single Dense(num_classes).

  The output layer: ``init_scheme="vpt"`` kernel kaiming-normal fan-out, bias
  -log(99) (VPT reference); ``"torch_default"`` both U(+-1/sqrt(fan_in)) (CVPT).

  Maps features (B, D) to logits (B, num_classes). BatchNorm's running averages
  live in the ``batch_stats`` collection.
  """
  num_classes: int
  hidden_layers: int = 0
  dropout_rate: float = 0.1
  init_scheme: str = "vpt"

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
    width = features.shape[-1]
    x = features
    for i in range(self.hidden_layers):
      x = nn.Dense(width, name=f"hidden_{i}",
                   kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                   bias_init=torch_default_uniform(width))(x)
      x = nn.relu(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM,
                       epsilon=BATCH_NORM_EPSILON, name=f"batchnorm_{i}")(x)
      x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    kernel_init, bias_init = _output_inits(self.init_scheme, width)
    kernel = self.param("kernel", kernel_init, (width, self.num_classes))
    bias = self.param("bias", bias_init, (self.num_classes,))
    return jnp.dot(x, kernel) + bias



def backbone_head(module: nn.Module) -> Head:
  """The ``Head`` named "head" of a backbone module, from the module's
  ``num_classes``, ``head_hidden_layers``, ``head_dropout`` and ``head_init``
  (``backbones.head_settings``); call it inside the module's compact method."""
  return Head(module.num_classes, hidden_layers=module.head_hidden_layers,
              dropout_rate=module.head_dropout, init_scheme=module.head_init, name="head")
