"""FacT-TT and FacT-TK: factor-tuning, weight updates shared across layers (Jie & Deng, AAAI 2023).

As JieShibo/PETL-ViT ``FacT/fact_tt.py`` and ``fact_tk.py``: every block's
q, k, v, out projections and MLP fc1/fc2 get an update through two factors
shared by all layers, U: D -> r (torch Linear default init,
U(-1/sqrt(D), 1/sqrt(D))) and V: r -> D (zeros), and a per-use core:

  q/k/v/out: y += s * V(dropout(C(U x)))
  fc1 (D -> 4D): y += s * V(dropout(C1(U x)).reshape(4, r)).reshape(4D)
  fc2 (4D -> D): y += s * V(dropout(C2(U(x.reshape(4, D)).reshape(4r))))

* TT: per-layer cores, Linear(r, r) for q/k/v/out, Linear(r, 4r) for fc1,
  Linear(4r, r) for fc2, torch default init U(-1/sqrt(fan_in), ..).
* TK: one tensor FacTc (r, r, r) and FacTp (r, 12 L) (both xavier_uniform as
  torch computes it); layer l's cores are FacTc @ FacTp[:, 12 l: 12 l + 4]
  (q, k, v, out: [..., 0..3]) and FacTc @ FacTp[:, 12 l + 4: 12 l + 12]
  reshaped (r, 4 r) for fc1 ([..., :4]) and transposed for fc2 ([..., 4:]),
  exactly the official reshapes. The official code hard-codes 144 = 12 x 12
  and D = 768 (ViT-B) and the MLP ratio 4; here they are (4 + 2 m) L, the
  backbone's width and m = mlp_dim / D.

Dropout 0.1 on the cores' output while training, drop path 0.1 (the official
``create_model(..., drop_path_rate=0.1)``), AdamW lr 1e-3, wd 1e-4; per-task
rank and s are in ``protocol.hparams.FACT_TASKS``. Parameters ``fact/u``,
``fact/v`` and TT's ``fact/{query,key,value,out,Dense_0,Dense_1}`` (L, in, out)
or TK's ``fact/c``, ``fact/p``. The update is linear in the weights: ``merge``
folds s * U C V into each kernel.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vpt_jax.methods import base
from vpt_jax.methods import reparam_common as common
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models.prompts import uniform_symmetric

FACT_PARAMS = r"fact/.*"
FACT_KINDS = ("tt", "tk")
ATTENTION_TARGETS = ("query", "key", "value", "out")
TARGETS = ATTENTION_TARGETS + ("Dense_0", "Dense_1")


def tk_columns(ratio: int) -> int:
  """TK's FacTp columns per layer: q, k, v, out, then fc1 and fc2 (``ratio`` each; 12 at 4)."""
  return 4 + 2 * ratio


def layer_cores(factors, depth: int, xp=jnp) -> dict:
  """Every layer's cores {target: (L, in, out)} from the factor parameters (TT or TK).

  ``xp`` is jax.numpy or numpy, so the merge builds exactly the model's cores.
  """
  if "c" not in factors:
    return {name: factors[name] for name in TARGETS}
  c, p = factors["c"], factors["p"]
  rank = c.shape[0]
  columns = p.shape[1] // depth
  ratio = (columns - 4) // 2
  cores = xp.einsum("abq,qlk->labk", c, p.reshape(rank, depth, columns))
  fc1 = cores[..., 4:4 + ratio].reshape(depth, rank, ratio * rank)
  fc2 = cores[..., 4 + ratio:].reshape(depth, rank, ratio * rank).transpose(0, 2, 1)
  return {**{name: cores[..., i] for i, name in enumerate(ATTENTION_TARGETS)},
          "Dense_0": fc1, "Dense_1": fc2}


class FactFactors(nn.Module):
  """The shared factors; returns {"u", "v", cores...}, each with a leading depth axis."""
  kind: str
  rank: int
  depth: int
  width: int
  ratio: int  # mlp_dim / width (4 in ViTs; the official code assumes it)

  @nn.compact
  def __call__(self, dtype):
    r, d, depth, m = self.rank, self.width, self.depth, self.ratio
    u = self.param("u", uniform_symmetric(1 / math.sqrt(d)), (d, r))
    v = self.param("v", nn.initializers.zeros, (r, d))
    if self.kind == "tt":
      shapes = {**{name: (r, r) for name in ATTENTION_TARGETS}, "Dense_0": (r, m * r),
                "Dense_1": (m * r, r)}
      factors = {name: self.param(name, uniform_symmetric(1 / math.sqrt(shape[0])),
                                  (depth,) + shape) for name, shape in shapes.items()}
    else:
      columns = tk_columns(m) * depth
      factors = {"c": self.param("c", uniform_symmetric(math.sqrt(6 / (2 * r * r))), (r, r, r)),
                 "p": self.param("p", uniform_symmetric(math.sqrt(6 / (columns + r))),
                                 (r, columns))}
    cores = layer_cores(factors, depth)
    shared = {"u": jnp.broadcast_to(u, (depth,) + u.shape),
              "v": jnp.broadcast_to(v, (depth,) + v.shape)}
    return {k: a.astype(dtype) for k, a in {**shared, **cores}.items()}


@dataclasses.dataclass(frozen=True)
class FactOptions(hooks_lib.TrainingDropPath):
  """FacT on every block's q/k/v/out and fc1/fc2."""
  changes_mlp_projections = True
  kind: str = "tt"
  rank: int = 8
  scale: float = 1.0
  dropout: float = 0.1

  def block_inputs(self, batch_size, geometry, dtype, *, train):
    del batch_size, train
    return FactFactors(self.kind, self.rank, geometry.depth, geometry.width,
                       geometry.mlp_dim // geometry.width, name="fact")(dtype)

  def projection_output(self, name, inputs, outputs, out_features, num_in_axes, dtype,
                        block=None):
    del out_features, dtype
    if name not in TARGETS or block is None:
      return outputs
    f = block.inputs
    width = f["u"].shape[0]
    x = inputs.reshape(inputs.shape[:inputs.ndim - num_in_axes] + (-1,))
    if name == "Dense_1":  # (..., 4D) -> (..., 4, D) -> U -> (..., 4r)
      x = x.reshape(x.shape[:-1] + (-1, width))
      low = (x @ f["u"]).reshape(x.shape[:-2] + (-1,))
    else:
      low = x @ f["u"]
    low = nn.Dropout(self.dropout)(low @ f[name], deterministic=not block.train)
    if name == "Dense_0":  # (..., 4r) -> (..., 4, r) -> V -> (..., 4D)
      delta = (low.reshape(low.shape[:-1] + (-1, self.rank)) @ f["v"])
    else:
      delta = low @ f["v"]
    return outputs + (self.scale * delta).reshape(outputs.shape).astype(outputs.dtype)


def weight_updates(factors, depth: int, scale: float) -> dict:
  """{target: (L, D_in, D_out) float64} the kernels' updates s * U C V, flattened axes."""
  f = {k: np.asarray(a, np.float64) for k, a in factors.items()}
  cores = layer_cores(f, depth, xp=np)
  u, v = f["u"], f["v"]
  rank, width = v.shape
  ratio = cores["Dense_0"].shape[-1] // rank
  updates = {name: np.einsum("dr,lrs,se->lde", u, cores[name], v) for name in
             ATTENTION_TARGETS}
  fc1 = np.einsum("dq,lqkr->ldkr", u, cores["Dense_0"].reshape(depth, rank, ratio, rank))
  updates["Dense_0"] = (fc1 @ v).reshape(depth, width, ratio * width)
  fc2 = cores["Dense_1"].reshape(depth, ratio, rank, rank) @ v  # (L, m, r, D)
  updates["Dense_1"] = np.einsum("cj,lkjo->lkco", u, fc2).reshape(depth, ratio * width, width)
  return {name: scale * update for name, update in updates.items()}


_KERNELS = {**{name: f"MultiHeadDotProductAttention_0/{name}/kernel"
               for name in ATTENTION_TARGETS},
            "Dense_0": "MlpBlock_0/Dense_0/kernel", "Dense_1": "MlpBlock_0/Dense_1/kernel"}


def merge(spec, flat: dict) -> dict:
  """Folds s * U C_l V into every block's six kernels; drops ``fact/``."""
  factors = {p[len("fact/"):]: v for p, v in flat.items() if p.startswith("fact/")}
  flat = {p: v for p, v in flat.items() if not p.startswith("fact/")}
  depth = sum(1 for p in flat if p.endswith("MlpBlock_0/Dense_0/kernel"))
  updates = weight_updates(factors, depth, spec["fact"]["scale"])
  for layer in range(depth):
    for name, update in updates.items():
      key = f"Transformer/encoderblock_{layer}/{_KERNELS[name]}"
      kernel = np.asarray(flat[key], np.float64)
      flat[key] = kernel + update[layer].reshape(kernel.shape)
  return flat


def _read_settings(config) -> base.Settings:
  section = config.fact
  return dict(rank=int(section.rank), scale=float(section.scale),
              dropout=float(section.dropout), drop_path=common.read_drop_path(section))


def _check_settings(settings: base.Settings, spec, geometry) -> None:
  del spec
  if geometry.mlp_dim % geometry.width:
    base.fail(f"FacT splits the MLP's {geometry.mlp_dim} hidden features into chunks of the "
              f"width {geometry.width}; use a ViT whose mlp_dim is a multiple of its width")
  if settings["rank"] < 1:
    base.fail(f"fact.rank must be >= 1, got {settings['rank']} (the official 8, 16 or 32)")
  if not 0.0 <= settings["dropout"] < 1.0:
    base.fail(f"fact.dropout={settings['dropout']} must lie in [0, 1) (the official 0.1)")
  common.check_drop_path("fact", settings["drop_path"])


def _method(kind: str) -> base.Method:
  return base.Method(
      f"fact_{kind}", base.train_only(FACT_PARAMS), fresh=(FACT_PARAMS,),
      optimizer=common.OPTIMIZER, settings="fact",
      description=f"FacT-{kind.upper()}: low-rank updates of every block's weights with "
                  "factors shared across layers, plus the head",
      read_settings=_read_settings, settings_check=_check_settings,
      make_hooks=lambda spec: FactOptions(kind=kind, **spec["fact"]), merge=merge)


METHODS = tuple(_method(kind) for kind in FACT_KINDS)
