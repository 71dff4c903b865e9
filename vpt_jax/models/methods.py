"""Adaptation methods: one name selects the model options and the trainable set.

Each method says which parameters train (ordered ``(regex, label)`` rules over
the ``/``-joined parameter path, first match wins), whether the backbone runs
in training mode (dropout) while tuning, and its default optimizer, exactly as
the VPT reference's ``MODEL.TRANSFER_TYPE`` table does (vpt.md 1.5, 2).
"""

from __future__ import annotations

import dataclasses
import difflib

TRAIN = "train"
FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class Method:
  """What one method trains and how the backbone behaves."""
  name: str
  trainable_rules: tuple[tuple[str, str], ...]
  uses_prompts: bool = False
  deep_prompts: bool = False
  backbone_dropout: bool = False  # backbone in train mode (dropout) while tuning
  optimizer: str = "sgd"
  description: str = ""


_HEAD = (r"head/.*", TRAIN)
_ALL_FROZEN = (r".*", FROZEN)

METHODS = {
    m.name: m for m in (
        Method("vpt_deep", (("vpt/.*", TRAIN), _HEAD, _ALL_FROZEN),
               uses_prompts=True, deep_prompts=True,
               description="VPT-deep: a prompt set before every block, plus the head"),
        Method("vpt_shallow", (("vpt/.*", TRAIN), _HEAD, _ALL_FROZEN),
               uses_prompts=True,
               description="VPT-shallow: one prompt set after the embedding, plus the head"),
        Method("linear", (_HEAD, _ALL_FROZEN),
               description="Linear probe: only the head trains"),
        Method("full", ((r".*", TRAIN),), backbone_dropout=True, optimizer="adamw",
               description="Full fine-tuning: every parameter trains (AdamW, dropout on)"),
    )
}


def get_method(name: str) -> Method:
  """Looks a method up by name; unknown names fail with the closest valid ones."""
  if name not in METHODS:
    close = difflib.get_close_matches(name, METHODS, n=3)
    raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}"
                     + (f" (did you mean {', '.join(close)}?)" if close else ""))
  return METHODS[name]
