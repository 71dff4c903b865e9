"""Adaptation methods: one name selects the model options and the trainable set.

Each method says which parameters train (ordered ``(regex, label)`` rules over
the ``/``-joined parameter path, first match wins), which parameters are its
own and therefore freshly initialised rather than read from the backbone file
(``fresh``), whether the backbone runs in training mode (dropout) while
tuning, its default optimizer and which config section holds its settings,
exactly as the VPT reference's ``MODEL.TRANSFER_TYPE`` table does (vpt.md 1.5,
2) for its baselines:

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
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from vpt_jax.params.freezing import FROZEN, TRAIN

# The method parameters' names (regexes, fully matched against "/"-joined paths).
HEAD_PARAMS = r"head/.*"
VPT_PARAMS = r"vpt/.*"
CVPT_PARAMS = r"cvpt/.*"
E2VPT_PARAMS = r"e2vpt/.*"
ADAPTER_PARAMS = r"Transformer/encoderblock_\d+/adapter/.*"
LORA_PARAMS = r"Transformer/encoderblock_\d+/MultiHeadDotProductAttention_0/lora_[a-z]+/.*"
SIDE_PARAMS = r"side/.*"
# Every bias vector: attention q/k/v/out, MLP, LayerNorms (encoder_norm too),
# the patch embedding; the head's are covered by the head rule.
BIAS_PARAMS = r"(.*/)?bias"


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
    settings: the config section with the method's options ("" = none).
    head_hidden_layers: k - 1 for MLP-k.
    last_blocks: k for partial-k.
    head_init: "vpt" or "torch_default" (see ``heads``).
  """
  name: str
  trainable_rules: tuple[tuple[str, str], ...]
  fresh: tuple[str, ...] = ()
  uses_prompts: bool = False
  deep_prompts: bool = False
  backbone_dropout: bool = False
  optimizer: str = "sgd"
  settings: str = ""
  head_hidden_layers: int = 0
  last_blocks: int = 0
  head_init: str = "vpt"
  description: str = ""

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
      raise ValueError(f"{self.name} tunes the last {self.last_blocks} blocks but the model "
                       f"has {depth}; use partial-k with k <= {depth}, or 'full'")
    blocks = "|".join(block_patterns[depth - self.last_blocks:])
    return ((rf"({blocks})/.*", TRAIN), (final_norm, TRAIN)) + self.trainable_rules


def _rules(*trained: str) -> tuple[tuple[str, str], ...]:
  """Train the given patterns and the head; freeze everything else."""
  return tuple((pattern, TRAIN) for pattern in trained) + ((HEAD_PARAMS, TRAIN), (r".*", FROZEN))


def partial(k: int) -> Method:
  """Partial-k: the last k blocks and the final LayerNorm, plus the head (AdamW)."""
  return Method(f"partial-{k}", _rules(), last_blocks=k,
                optimizer="adamw",
                description=f"Partial-{k}: the last {k} block(s), encoder_norm and the head")


def mlp(k: int) -> Method:
  """MLP-k: a head of k - 1 hidden layers on the frozen backbone's features (SGD)."""
  return Method(f"mlp-{k}", _rules(), head_hidden_layers=k - 1, settings="mlp",
                description=f"MLP-{k}: {k - 1} hidden Dense-ReLU-BatchNorm-Dropout layer(s) "
                            "and the output layer")


_PARAMETRISED = {"partial": (partial, 1), "mlp": (mlp, 2)}

METHODS = {
    m.name: m for m in (
        Method("vpt_deep", _rules(VPT_PARAMS), fresh=(VPT_PARAMS,),
               uses_prompts=True, deep_prompts=True,
               description="VPT-deep: a prompt set before every block, plus the head"),
        Method("vpt_shallow", _rules(VPT_PARAMS), fresh=(VPT_PARAMS,),
               uses_prompts=True,
               description="VPT-shallow: one prompt set after the embedding, plus the head"),
        Method("vpt+bias", _rules(VPT_PARAMS, BIAS_PARAMS), fresh=(VPT_PARAMS,),
               uses_prompts=True, deep_prompts=True,
               description="VPT-deep prompts and every bias vector, plus the head"),
        Method("linear", _rules(),
               description="Linear probe: only the head trains"),
        Method("full", ((r".*", TRAIN),), backbone_dropout=True, optimizer="adamw",
               description="Full fine-tuning: every parameter trains (AdamW, dropout on)"),
        *(partial(k) for k in (1, 2, 4)),
        *(mlp(k) for k in (2, 3, 5, 9)),
        Method("bias", _rules(BIAS_PARAMS), optimizer="adamw",
               description="Bias (BitFit): every bias vector, LayerNorm and patch "
                           "embedding biases included, plus the head"),
        Method("adapter", _rules(ADAPTER_PARAMS), fresh=(ADAPTER_PARAMS,), optimizer="adamw",
               settings="adapter",
               description="Pfeiffer adapters after every block's MLP, plus the head"),
        Method("sidetune", _rules(SIDE_PARAMS), fresh=(SIDE_PARAMS,), settings="sidetune",
               description="Side-tuning: a side CNN blended with the frozen features by "
                           "a learned gate, plus the head"),
        Method("cvpt", _rules(CVPT_PARAMS), fresh=(CVPT_PARAMS,), optimizer="torch_adamw",
               settings="cvpt", head_init="torch_default",
               description="CVPT: per-block prompts the tokens cross-attend to with the "
                           "block's own attention weights, plus the head"),
        Method("lora", _rules(LORA_PARAMS), fresh=(LORA_PARAMS,), optimizer="adamw",
               settings="lora",
               description="LoRA: low-rank updates of the attention projections, plus the head"),
        Method("vfpt", _rules(VPT_PARAMS), fresh=(VPT_PARAMS,), uses_prompts=True,
               deep_prompts=True, settings="vfpt",
               description="VFPT: VPT-deep with part of every prompt set Fourier-"
                           "transformed, plus the head"),
        Method("e2vpt", _rules(VPT_PARAMS, E2VPT_PARAMS), fresh=(VPT_PARAMS, E2VPT_PARAMS),
               uses_prompts=True, deep_prompts=True, settings="e2vpt",
               description="E2VPT: VPT-deep prompts and key-value prompts in every "
                           "attention, plus the head (no pruning)"),
    )
}


def get_method(name: str) -> Method:
  """Looks a method up by name; unknown names fail with the closest valid ones.

  ``partial-k`` and ``mlp-k`` work for any integer k (k >= 1, resp. k >= 2)
  besides the registered paper settings.
  """
  if name in METHODS:
    return METHODS[name]
  match = re.fullmatch(r"([a-z]+)-(\d+)", name)
  if match and match.group(1) in _PARAMETRISED:
    make, smallest = _PARAMETRISED[match.group(1)]
    k = int(match.group(2))
    if k < smallest:
      raise ValueError(f"{name}: k must be >= {smallest}, e.g. {match.group(1)}-{smallest}")
    return make(k)
  close = difflib.get_close_matches(name, METHODS, n=3)
  raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))} "
                   "(partial-k and mlp-k take any k)"
                   + (f" (did you mean {', '.join(close)}?)" if close else ""))
