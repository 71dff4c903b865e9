"""Bottleneck adapters: Houlsby, AdaptFormer and Adapter+ (each as its official code).

Each adapter is ``adapter_parts.Bottleneck`` (Down -> activation -> dropout
-> Up) at its own place in the block, with its own init and scaling
(x is the residual stream, LN0/LN1 the block's norms, s a fixed scale):

* **Houlsby** (Houlsby et al. 2019, as OSU-MLB/ViT_PEFT_Vision's
  ``rand_h_adapter``): sequential adapters after the attention and after the
  MLP, a <- a + s Bottleneck(a) for each branch a before its residual; ReLU,
  dropout 0.1, both projections xavier-uniform (biases N(0, 1e-6^2)), so the
  model does not start at the backbone. Parameters
  ``Transformer/encoderblock_{i}/houlsby_{attention,mlp}/{down,up}/...``.
  The paper initialises near identity (small weights) and has no scale s; the
  code's xavier init and s are followed.
* **AdaptFormer** (Chen et al. 2022, ShoufaChen/AdaptFormer ``vit_image``):
  a parallel branch beside the MLP reading the stream x after the attention
  residual (not LN1 x): x <- x + MLP(LN1 x) + s Bottleneck(x); ReLU, dropout
  0.1, LoRA init (Down U(+-1/sqrt(D)), Up and biases zero: the model starts at
  the backbone), s = 0.1, bottleneck 64, ``norm`` none (the code's default; "in"
  normalises the adapter's input, "out" its scaled output, with torch's
  LayerNorm eps 1e-5). Parameters ``.../adaptformer/{down,up,norm}/...``.
  The paper draws the branch from LN1's output in its figure; the code reads x.
* **Adapter+** (Steitz & Roth 2024, visinf/adapter_plus ``adapter_plus``):
  a post-adapter after the block, x <- x + scale * DP(Bottleneck(x)) with a
  channel-wise scale (D,) starting at ones, exact GELU, no norm, no dropout,
  the Houlsby init (kernels N(0, 0.01^2) truncated at +-2 std, biases zero)
  and drop path 0.1 on the adapter branch while training. Parameters
  ``.../adapter_plus/{down,up}/...`` and ``.../adapter_plus/scale``.

While training, ``backbone_drop_path`` is the official codes' stochastic
depth on the frozen branches (linear over the blocks): 0.1 for Houlsby (OSU's
drop_path_rate, on the attention/MLP branch with its adapter) and Adapter+
(its vit.drop_path), 0 for AdaptFormer (main_image.py's default); the
adapters' own dropout acts while training (``adapter_parts``).
AdaptFormer's "learnable_scalar" scale is not offered.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from vpt_jax.methods import adapter_parts
from vpt_jax.methods import base
from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models import lean_ops

HOULSBY_PARAMS = r"Transformer/encoderblock_\d+/houlsby_(attention|mlp)/.*"
ADAPTFORMER_PARAMS = r"Transformer/encoderblock_\d+/adaptformer/.*"
ADAPTER_PLUS_PARAMS = r"Transformer/encoderblock_\d+/adapter_plus/.*"
ADAPTFORMER_NORMS = ("none", "in", "out")
TORCH_LAYER_NORM_EPSILON = 1e-5  # nn.LayerNorm's default, AdaptFormer's adapter norm


@dataclasses.dataclass(frozen=True)
class HoulsbyOptions(adapter_parts.StochasticHooks):
  """Houlsby adapters after attention and MLP: a + scale * Bottleneck(a)."""
  bottleneck: int = 8
  scale: float = 0.1
  dropout: float = 0.1
  backbone_drop_path: float = 0.1

  def _adapt(self, branch, block, name):
    adapter = adapter_parts.Bottleneck(self.bottleneck, "relu", "xavier", self.dropout,
                                       dtype=block.dtype, name=name)
    return branch + adapter(branch, block.train) * jnp.asarray(self.scale, branch.dtype)

  def attention_branch(self, branch, x, block):
    return self._adapt(branch, block, "houlsby_attention")

  def mlp_branch(self, branch, block):
    return self._adapt(branch, block, "houlsby_mlp")


class AdaptFormerBranch(nn.Module):
  """s * Bottleneck(x) with AdaptFormer's optional LayerNorm ("in" or "out"). (B, N, D)."""
  bottleneck: int
  scale: float
  norm: str
  dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    layer_norm = lean_ops.LayerNorm(epsilon=TORCH_LAYER_NORM_EPSILON, dtype=self.dtype, name="norm")
    if self.norm == "in":
      x = layer_norm(x)
    up = adapter_parts.bottleneck(x, self.bottleneck, "relu", "lora", self.dropout, train,
                                  dtype=self.dtype)
    up = up * jnp.asarray(self.scale, up.dtype)
    return layer_norm(up) if self.norm == "out" else up


@dataclasses.dataclass(frozen=True)
class AdaptFormerOptions(adapter_parts.StochasticHooks):
  """AdaptFormer: x + MLP(LN1 x) + scale * Bottleneck(x) (norm in ADAPTFORMER_NORMS)."""
  bottleneck: int = 64
  scale: float = 0.1
  norm: str = "none"
  dropout: float = 0.1

  def mlp_parallel(self, normed, x, block):
    del normed  # the official branch reads the un-normalised stream
    return AdaptFormerBranch(self.bottleneck, self.scale, self.norm, self.dropout,
                             dtype=block.dtype, name="adaptformer")(x, block.train)


class AdapterPlus(nn.Module):
  """scale * DP(Up(GELU(Down(x)))), scale (D,) from ones. (B, N, D) -> (B, N, D)."""
  bottleneck: int
  drop_path: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    h = adapter_parts.bottleneck(x, self.bottleneck, "gelu", "houlsby", dtype=self.dtype)
    return adapter_parts.drop_path(h, self.drop_path, train) * scale.astype(h.dtype)


@dataclasses.dataclass(frozen=True)
class AdapterPlusOptions(adapter_parts.StochasticHooks):
  """Adapter+: block output x -> x + scale * DP(Bottleneck(x))."""
  bottleneck: int = 8
  drop_path: float = 0.1
  backbone_drop_path: float = 0.1

  def block_output(self, x, block):
    return x + AdapterPlus(self.bottleneck, self.drop_path, dtype=block.dtype,
                           name="adapter_plus")(x, block.train)


def _read_houlsby(config) -> base.Settings:
  section = config.houlsby
  return dict(bottleneck=int(section.bottleneck), scale=float(section.scale),
              dropout=float(section.dropout),
              backbone_drop_path=float(section.backbone_drop_path))


def _read_adaptformer(config) -> base.Settings:
  section = config.adaptformer
  return dict(bottleneck=int(section.bottleneck), scale=float(section.scale),
              norm=str(section.norm), dropout=float(section.dropout),
              backbone_drop_path=float(section.backbone_drop_path))


def _read_adapter_plus(config) -> base.Settings:
  section = config.adapter_plus
  return dict(bottleneck=int(section.bottleneck), drop_path=float(section.drop_path),
              backbone_drop_path=float(section.backbone_drop_path))


def _checker(section: str):
  """The settings check of ``section``: bottleneck, rates and AdaptFormer's norm."""
  def check(settings: base.Settings, spec, geometry: hooks_lib.Geometry) -> None:
    del spec
    adapter_parts.check_bottleneck(section, settings["bottleneck"], geometry.width)
    for rate in ("dropout", "drop_path", "backbone_drop_path"):
      if rate in settings:
        adapter_parts.check_rate(f"{section}.{rate}", settings[rate])
    if settings.get("norm", "none") not in ADAPTFORMER_NORMS:
      base.fail(f"Unknown {section}.norm {settings['norm']!r}; choose one of "
                f"{ADAPTFORMER_NORMS}")
  return check


METHODS = (
    base.Method("houlsby", base.train_only(HOULSBY_PARAMS), fresh=(HOULSBY_PARAMS,),
                optimizer="torch_adamw", settings="houlsby",
                description="Houlsby adapters after every attention and MLP, plus the head",
                read_settings=_read_houlsby, settings_check=_checker("houlsby"),
                make_hooks=lambda spec: HoulsbyOptions(**spec["houlsby"])),
    base.Method("adaptformer", base.train_only(ADAPTFORMER_PARAMS),
                fresh=(ADAPTFORMER_PARAMS,), optimizer="sgd", settings="adaptformer",
                description="AdaptFormer: a scaled bottleneck beside every MLP, plus the head",
                read_settings=_read_adaptformer, settings_check=_checker("adaptformer"),
                make_hooks=lambda spec: AdaptFormerOptions(**spec["adaptformer"])),
    base.Method("adapter_plus", base.train_only(ADAPTER_PLUS_PARAMS),
                fresh=(ADAPTER_PLUS_PARAMS,), optimizer="torch_adamw", settings="adapter_plus",
                description="Adapter+: a channel-scaled adapter after every block, plus the "
                            "head",
                read_settings=_read_adapter_plus, settings_check=_checker("adapter_plus"),
                make_hooks=lambda spec: AdapterPlusOptions(**spec["adapter_plus"])),
)
