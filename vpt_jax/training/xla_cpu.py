"""XLA:CPU's instruction scheduler, chosen before JAX creates its CPU backend.

XLA:CPU's default scheduler favours concurrency: it starts independent work
as early as it can, which keeps more buffers alive at once. Its
memory-minimising scheduler trains ViT-B/16 as fast on a 2-core CPU (VPT-deep
5.95 s per step with either, full fine-tuning 9.8-9.9 s) at a lower peak
(2.72 against 3.12 GiB for VPT-deep, 5.0 against 5.3 GiB for full fine-tuning,
two CPU devices, batch 16; benchmarks/README.md), so the command line and the
benchmarks select it unless ``XLA_FLAGS`` already choose. The flag is
XLA:CPU's own: GPU and TPU backends ignore it.
"""

from __future__ import annotations

import os
from typing import MutableMapping

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
SCHEDULERS = ("memory", "concurrency")


def use_scheduler(name: str = "memory", environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds XLA:CPU's scheduler choice to ``XLA_FLAGS`` unless they already hold one.

  Must run before JAX creates its CPU backend (the first device query).
  ``name``: "memory" (memory-minimising) or "concurrency" (XLA's default).
  """
  if name not in SCHEDULERS:
    raise ValueError(f"Unknown XLA:CPU scheduler {name!r}; choose one of {SCHEDULERS}")
  flags = environ.get("XLA_FLAGS", "")
  if SCHEDULER_FLAG in flags:
    return
  value = "false" if name == "memory" else "true"
  environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}={value}".strip()
