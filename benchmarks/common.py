"""What the benchmark scripts share: the model setup of a method, random inputs, timing, tables.

Imported by the scripts of this folder (``import common as bench_lib``); the
scripts put the repository root on ``sys.path`` before importing it.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from configs import common
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.training import optimizers
from vpt_jax.params import freezing

# The {"mean", "std"} keywords of the steps (data.normalization imports no
# TensorFlow, which would raise the benchmarks' peak-RSS figures).
IMAGENET_NORM = normalization_lib.mean_std("imagenet")
MINUS_ONE_TO_ONE_NORM = normalization_lib.mean_std("minus_one_to_one")
# The constant learning rate and weight decay of the timed steps (values do not
# change a step's cost).
LEARNING_RATE = 0.01
WEIGHT_DECAY = 1e-4


def model_arguments(doc: str) -> argparse.ArgumentParser:
  """A parser with the model and batch options every step benchmark takes (ViT-B/16 default)."""
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--num_prompts", type=int, default=50)
  parser.add_argument("--num_classes", type=int, default=10)
  add_kernel_arguments(parser)
  return parser


def add_kernel_arguments(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
  """--attention (model.attention) and, unless the benchmark sweeps it, --dtype."""
  parser.add_argument("--attention", default="einsum",
                      help="model.attention: einsum | dot_product (jax.nn.dot_product_attention) "
                           "| recompute (the backward recomputes the attention weights)")
  if dtype:
    parser.add_argument("--dtype", default="float32", help="model.dtype: float32 | bfloat16")


def apply_kernel_arguments(config, args) -> None:
  """Sets model.attention (and model.dtype if the parser has --dtype) from ``args``."""
  config.model.attention = args.attention
  if hasattr(args, "dtype"):
    config.model.dtype = args.dtype


def method_config(method: str, variant: str, image_size: int,
                  num_prompts: Optional[int] = None):
  """The base run config with ``method``'s defaults, a backbone and (optionally) a prompt count."""
  config = common.base_config()
  common.apply_method(config, method)
  config.model.variant = variant
  config.model.image_size = image_size
  if num_prompts is not None:
    config.prompt.num_prompts = num_prompts
  return config


class Setup(NamedTuple):
  model: Any
  variables: dict  # {"params", and "batch_stats" if any}; ShapeDtypeStructs if abstract
  labels: dict
  tx: Any
  schedule: Callable


def setup(config, num_classes: int, *, abstract: bool = False) -> Setup:
  """The trainer's model, labels and optimizer for ``config``, with a constant learning rate.

  Random-init variables (seed 0), or only their shapes with ``abstract``.
  """
  model = factory.build_model(factory.model_spec(config), num_classes)
  variables = (factory.variable_shapes(model, config.model.image_size) if abstract
               else factory.init_variables(model, config.model.image_size, 0))
  labels = freezing.label_params(variables["params"], factory.trainable_rules(config))
  schedule = lambda step: LEARNING_RATE
  tx = optimizers.make_optimizer(
      labels, name=config.optim.name or registry.get_method(config.method).optimizer,
      learning_rate=schedule, weight_decay=WEIGHT_DECAY)
  return Setup(model, variables, labels, tx, schedule)


def random_batch(size: int, image_size: int, num_classes: int, seed: int = 0) -> dict:
  """{"image": uint8 (size, image_size, image_size, 3), "label": int32 (size,)}, random."""
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (size, image_size, image_size, 3), dtype=np.uint8),
          "label": rng.integers(0, num_classes, (size,)).astype(np.int32)}


def median_seconds(call: Callable[[], Any], runs: int) -> float:
  """Median wall seconds of ``runs`` calls of ``call()`` after one warm-up call.

  Each call is timed until its result is ready (``jax.block_until_ready``).
  """
  jax.block_until_ready(call())
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def peak_rss_bytes() -> int:
  """The process's peak resident set size so far (``ru_maxrss``, kB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def print_table_header(columns) -> None:
  """The header and separator lines of a markdown table."""
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns), flush=True)


def table_row(values, number_format: str = ".3g") -> str:
  """A markdown table row: strings as they are, numbers in ``number_format``."""
  return "| " + " | ".join(v if isinstance(v, str) else format(v, number_format)
                           for v in values) + " |"
