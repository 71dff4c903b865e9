"""What a run costs, measured in the run: parameters, export size, speed, memory, FLOPs.

``run_costs`` is what results.json holds under "cost" (``eval.costs``):

* ``trainable_params`` / ``trainable_params_without_head``: the trainable
  leaves' sizes, with and without the classifier head (``head/...``);
* ``export_bytes``: the task export's files (what a task adds to a deployment);
* ``train_images_per_s``: training images per second between the first and the
  last logged step (after compilation; validation passes excluded), from
  the loop (``Run.costs``); a fused sweep reports its program's, which trains
  k settings on each image (``fused_settings``);
* ``peak_memory_bytes`` and ``memory_kind``: the device's peak bytes in use
  (``memory_stats``, GPU/TPU) or, where the device has none (CPU), the
  process's peak resident set size;
* ``inference_images_per_s``: the jitted forward on one eval batch of random
  images, after a warm-up call, mean over ``TIMED_CALLS`` calls;
* ``flops_per_image``: XLA's cost analysis of that compiled forward / batch;
* ``mergeable``: whether the method's trained state merges into the backbone's
  weights, so inference costs what the backbone costs (``MERGEABLE``);
* ``device``: platform, kind and count.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from typing import Optional

import jax
import numpy as np
import tensorflow as tf

from vpt_jax.methods import base
from vpt_jax.params import freezing
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.training import setup
from vpt_jax.training import steps as steps_lib

TIMED_CALLS = 3
# Whether a method's trained state folds into the backbone's weights (no extra
# inference work): heads, biases, partial/full tuning change weights in place and
# LoRA's B @ A adds to W; prompts add tokens, adapters and side networks add layers.
MERGEABLE = {
    "linear": True, "mlp-2": True, "mlp-3": True, "mlp-5": True, "mlp-9": True,
    "full": True, "partial-1": True, "partial-2": True, "partial-4": True, "bias": True,
    "lora": True, "vpt_deep": False, "vpt_shallow": False, "vpt+bias": False,
    "vfpt": False, "e2vpt": False, "adapter": False, "sidetune": False, "cvpt": False,
}


def device() -> dict:
  """{"platform", "kind", "count"} of the devices the run uses."""
  first = jax.devices()[0]
  return {"platform": first.platform, "kind": first.device_kind, "count": jax.device_count()}


def peak_memory() -> tuple[int, str]:
  """(bytes, kind): the first device's peak bytes in use, else the process's peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
  return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def trainable_without_head(params, labels) -> int:
  """Trainable parameters outside the classifier head (``base.HEAD_PARAMS``)."""
  head = re.compile(base.HEAD_PARAMS)
  trainable = freezing.split(params, labels)[0]  # flat: path -> array
  return sum(int(np.prod(v.shape)) for path, v in trainable.items() if not head.fullmatch(path))


def folder_bytes(path: Optional[str]) -> Optional[int]:
  """Bytes of the files below ``path`` (None: no folder)."""
  if not path or not tf.io.gfile.isdir(path):
    return None
  return sum(tf.io.gfile.stat(f"{root}/{name}").length
             for root, _, names in tf.io.gfile.walk(path) for name in names)


def inference(run: setup.Run) -> dict:
  """{"inference_images_per_s", "flops_per_image"} of the run's jitted forward.

  One eval batch (``eval.batch_size``) of random normalised images, split over
  the run's devices as evaluation splits it. Single-process jobs only (None
  for both on several hosts: a global batch would need every host).
  """
  if jax.process_count() > 1:
    return {"inference_images_per_s": None, "flops_per_image": None}
  batch = run.config.eval.batch_size
  size = run.config.model.image_size
  variables = steps_lib.model_variables(run.state)
  # Drawn by NumPy: jax.random would compile its generator first (~0.8 s on CPU).
  images = jax.device_put(
      np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32),
      mesh_lib.batch_sharded(run.mesh))
  forward = jax.jit(lambda v, x: run.model.apply(v, x, train=False))
  compiled = forward.lower(variables, images).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  compiled(variables, images).block_until_ready()  # warm-up
  began = time.perf_counter()
  for _ in range(TIMED_CALLS):
    compiled(variables, images).block_until_ready()
  seconds = (time.perf_counter() - began) / TIMED_CALLS
  return {"inference_images_per_s": batch / seconds,
          "flops_per_image": None if flops is None else float(flops) / batch}


def run_costs(run: setup.Run, export_dir: Optional[str],
              measured: Optional[dict] = None) -> dict:
  """The "cost" entry of results.json (module docstring); ``measured``: ``inference(run)``
  if already measured (a sweep's settings share one)."""
  params = run.state["params"]
  memory, memory_kind = peak_memory()
  return {"trainable_params": freezing.count(freezing.split(params, run.labels)[0]),
          "trainable_params_without_head": trainable_without_head(params, run.labels),
          "export_bytes": folder_bytes(export_dir),
          **run.costs, **(measured or inference(run)),
          "peak_memory_bytes": memory, "memory_kind": memory_kind,
          "mergeable": MERGEABLE.get(run.config.method), "device": device()}
