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
vfpt           VPT-deep prompts, part Fourier-transformed        sgd
e2vpt          VPT-deep prompts and key-value prompts            sgd
=============  ================================================  ==============

``partial-k`` and ``mlp-k`` accept any k >= 1 (resp. >= 2); the paper's are
partial-1/2/4 and mlp-2/3/5/9. The backbone runs in eval mode (no dropout) for
every method but ``full``, as the reference's ``froze_enc`` does; CVPT keeps
its reference's stochastic depth (``cvpt.drop_path``) while training.

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
from vpt_jax.methods import cvpt
from vpt_jax.methods import full
from vpt_jax.methods import head_only
from vpt_jax.methods import lora
from vpt_jax.methods import partial
from vpt_jax.methods import prompts
from vpt_jax.methods import sidetune

_MODULES = (prompts, head_only, full, partial, bias, adapter, sidetune, cvpt, lora)

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
