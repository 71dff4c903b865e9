"""Every adaptation method by name (``config.method``), one line per method module.

=============  ================================================  ==============
method         trains (always plus the head)                     optimizer
=============  ================================================  ==============
linear         nothing else                                      sgd
full           everything (backbone dropout on)                  adamw
partial-k      the last k blocks and ``encoder_norm``            adamw
mlp-k          the head's k - 1 hidden layers (the head)         sgd
bias           every bias vector (BitFit)                        adamw
adapter        Pfeiffer adapters after every MLP                 adamw
sidetune       the side CNN, its projection and the gate alpha   sgd
vpt_shallow    one prompt set                                    sgd
vpt_deep       a prompt set per block                            sgd
vpt+bias       VPT-deep prompts and every bias vector            sgd
cvpt           CVPT's per-block cross-attention prompts          torch_adamw
lora           LoRA factors of the attention projections         adamw
houlsby        Houlsby adapters after every attention and MLP    torch_adamw
adaptformer    AdaptFormer's scaled bottleneck beside every MLP  sgd
adapter_plus   Adapter+'s channel-scaled adapter after a block   torch_adamw
convpass       Convpass's conv bypasses beside attention and MLP torch_adamw
vfpt           VPT-deep prompts, part Fourier-transformed        sgd
e2vpt          VPT-deep prompts and key-value prompts            sgd
ssf            a scale and shift after every linear map and LN   timm_adamw
difffit        biases, LayerNorms, per-block branch scales       torch_adamw
ln_tune        every LayerNorm's scale and bias                  torch_adamw
fact_tt        FacT-TT: shared U, V, per-layer cores             torch_adamw
fact_tk        FacT-TK: shared U, V, core tensor, layer factors  torch_adamw
repadapter     group-wise linear adapters before attention, MLP  torch_adamw
vqt            per-block query tokens (+ their combine weights)  sgd
=============  ================================================  ==============

``partial-k`` and ``mlp-k`` accept any k >= 1 (resp. >= 2); the paper's are
partial-1/2/4 and mlp-2/3/5/9. The backbone runs in eval mode (no dropout) for
every method but ``full``, as the reference's ``froze_enc`` does; CVPT keeps
its reference's stochastic depth (``cvpt.drop_path``) while training, and so
do the re-parameterisable methods (ssf ... repadapter: ``<section>.drop_path``),
which also merge into the backbone (``export.merging``).

A new method is a module exposing ``METHODS`` (a tuple of ``base.Method``)
and one line in ``_MODULES``.
"""

from __future__ import annotations

import difflib
import re

from vpt_jax import errors
from vpt_jax.methods import adapter
from vpt_jax.methods import base
from vpt_jax.methods import bias
from vpt_jax.methods import bottleneck_adapters
from vpt_jax.methods import convpass
from vpt_jax.methods import cvpt
from vpt_jax.methods import difffit
from vpt_jax.methods import fact
from vpt_jax.methods import full
from vpt_jax.methods import head_only
from vpt_jax.methods import lora
from vpt_jax.methods import partial
from vpt_jax.methods import prompts
from vpt_jax.methods import repadapter
from vpt_jax.methods import sidetune
from vpt_jax.methods import ssf
from vpt_jax.methods import vqt

_MODULES = (prompts, head_only, full, partial, bias, adapter, sidetune, cvpt, lora)
_MODULES += (bottleneck_adapters, convpass)
_MODULES += (ssf, difffit, fact, repadapter)  # re-parameterisable methods (merge into the backbone)
_MODULES += (vqt,)

METHODS = {method.name: method for module in _MODULES for method in module.METHODS}

# "name-k" methods built for any k: name -> (maker, smallest k).
_PARAMETRISED = {"partial": (partial.partial, partial.SMALLEST_K),
                 "mlp": (head_only.mlp, head_only.SMALLEST_K)}


def get_method(name: str) -> base.Method:
  """Looks a method up by name; unknown names fail with the closest valid ones.

  ``partial-k`` and ``mlp-k`` work for any integer k (k >= 1, resp. k >= 2)
  besides the registered paper settings.

  Raises:
    ValueError: an unknown name (with the valid ones and the closest), or k
      below the smallest.
  """
  if name in METHODS:
    return METHODS[name]
  match = re.fullmatch(r"([a-z]+)-(\d+)", name)
  if match and match.group(1) in _PARAMETRISED:
    make, smallest = _PARAMETRISED[match.group(1)]
    k = int(match.group(2))
    if k < smallest:
      raise errors.UserError(f"{name}: k must be >= {smallest}, e.g. {match.group(1)}-{smallest}")
    return make(k)
  close = difflib.get_close_matches(name, METHODS, n=3)
  raise errors.UserError(f"Unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))} "
                         "(partial-k and mlp-k take any k)"
                         + (f" (did you mean {', '.join(close)}?)" if close else ""))
