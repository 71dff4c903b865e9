r"""Train-step memory of the accelerator options: remat, bfloat16, gradient accumulation.

For each variant and each combination of ``--remats``, ``--dtypes`` and
``--accumulations`` the library's jitted train step (VPT-deep by default, the
trainer's optimizer and partitioned state, donated buffers) is lowered and
compiled on abstract shapes, so ViT-L/16 and ViT-H/14 need no parameters in
memory and no run; XLA's ``memory_analysis()`` gives the bytes the compiled
step needs:

* temp: the step's scratch buffers, above all the activations kept for the
  backward pass (what remat and accumulation shrink);
* arguments: the state (parameters and optimizer state) and the batch;
* peak = arguments + temp + outputs not aliased to donated arguments.

"kept MiB" is JAX's own count (``print_saved_residuals``) of the activations the
backward pass of one (micro-)batch reads, parameters excluded: what the model
and remat ask for, before any backend's scheduling.

On CPU the step is compiled with XLA's memory-minimising scheduler
(``--cpu_scheduler memory``, the default here): the default CPU scheduler
favours concurrency and runs remat's recomputation as early as it can, which
keeps every block's activations alive and hides the saving. The CPU backend
also computes bfloat16 in float32 internally, so bfloat16's memory saving only
shows on GPU/TPU. GFLOP is XLA's count for the compiled program; with
accumulation > 1 the micro-batch loop body is counted once, so it is left out.

With ``--time_steps N`` the parameters are materialised (random init) and the
median of N timed steps (after one warm-up) is reported as well: what remat and
accumulation cost, and what bfloat16 gains.

  python benchmarks/memory.py                                 # L/16, H/14 at 224 px, batch 32
  python benchmarks/memory.py --variants B/16 --batch_size 64 --time_steps 3
  python benchmarks/memory.py --variants test4/4 --image_size 32 --batch_size 8 \
      --accumulations 1,4 --time_steps 2                      # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
from jax import ad_checkpoint  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

import common as bench_lib  # pylint: disable=g-import-not-at-top
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.methods import factory  # pylint: disable=g-import-not-at-top
from vpt_jax.params import freezing  # pylint: disable=g-import-not-at-top
from vpt_jax.training import steps  # pylint: disable=g-import-not-at-top
from vpt_jax.training import xla_cpu  # pylint: disable=g-import-not-at-top

GIB = 2 ** 30


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="L/16,H/14")
  parser.add_argument("--method", default="vpt_deep")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32, help="global batch per step")
  parser.add_argument("--num_prompts", type=int, default=50)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--remats", default="none,block", help="model.remat values to compare")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="model.dtype values")
  bench_lib.add_kernel_arguments(parser, dtype=False)
  parser.add_argument("--accumulations", default="1",
                      help="optim.accumulation_steps values (micro-batch = batch / k)")
  parser.add_argument("--time_steps", type=int, default=0,
                      help="also run and time this many steps (0 = compile only)")
  parser.add_argument("--cpu_scheduler", choices=("memory", "concurrency"), default="memory",
                      help="XLA:CPU's instruction scheduler (no effect on GPU/TPU)")
  return parser.parse_args(argv)


RESIDUAL_LINE = re.compile(r"(\S+)\[([\d,]*)\] (.*)")
BYTES_PER_ELEMENT = {"bool": 1, "key<fry>": 8}


def element_bytes(short_dtype: str) -> int:
  """Bytes of one element of a short dtype name as JAX prints it (f32, bf16, i32, ...)."""
  match = re.fullmatch(r"(?:bf|f|i|u|s)(\d+)", short_dtype)
  if match:
    return int(match.group(1)) // 8
  if short_dtype in BYTES_PER_ELEMENT:
    return BYTES_PER_ELEMENT[short_dtype]
  raise ValueError(f"unknown dtype {short_dtype!r} in JAX's residual listing; add its size "
                   "to BYTES_PER_ELEMENT")


def kept_activation_bytes(model, labels, param_shapes, batch_size: int, args) -> int:
  """Bytes of the activations the trainable gradient keeps, parameters excluded (no compute)."""
  trainable, frozen = freezing.split(param_shapes, labels)
  size = args.image_size
  listing = io.StringIO()

  def trace(trainable, frozen, images, labels_):
    def loss(trainable_params):
      logits = model.apply({"params": freezing.merge(trainable_params, frozen)},
                           normalization_lib.normalize_images(images, **bench_lib.IMAGENET_NORM),
                           train=True, rngs={"dropout": jax.random.key(0)})
      return steps.cross_entropy(logits, labels_).mean()
    with contextlib.redirect_stdout(listing):
      ad_checkpoint.print_saved_residuals(loss, trainable)
    return 0

  jax.eval_shape(trace, trainable, frozen,
                 jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
                 jax.ShapeDtypeStruct((batch_size,), jnp.int32))
  total = 0
  for line in listing.getvalue().splitlines():
    short_dtype, dims, origin = RESIDUAL_LINE.fullmatch(line).groups()
    # Parameters (arguments, or the frozen ones closed over as constants) stay
    # in memory whatever the backward pass needs.
    if any(word in origin for word in ("from the argument", "constant", "literal")):
      continue
    total += math.prod(int(d) for d in dims.split(",") if d) * element_bytes(short_dtype)
  return total


def measure(args, variant: str, remat: str, dtype: str, accumulation: int) -> dict:
  """Compiles (and optionally times) one train step; returns a row of the table."""
  config = bench_lib.method_config(args.method, variant, args.image_size, args.num_prompts)
  config.model.remat = remat
  config.model.dtype = dtype
  bench_lib.apply_kernel_arguments(config, args)
  model, variables, labels, tx, schedule = bench_lib.setup(config, args.num_classes,
                                                           abstract=True)
  param_shapes = variables["params"]
  state_shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": param_shapes,
                  "opt_state": jax.eval_shape(tx.init, param_shapes)}
  size = args.image_size
  batch_shapes = {"image": jax.ShapeDtypeStruct((args.batch_size, size, size, 3), jnp.uint8),
                  "label": jax.ShapeDtypeStruct((args.batch_size,), jnp.int32)}
  step_fn = jax.jit(steps.make_train_step(model, labels, tx, schedule,
                                          **bench_lib.IMAGENET_NORM,
                                          accumulation_steps=accumulation),
                    donate_argnums=(0,))
  began = time.perf_counter()
  compiled = step_fn.lower(state_shapes, batch_shapes,
                           jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()
  compile_seconds = time.perf_counter() - began
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.temp_size_in_bytes
          + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  row = {"variant": variant, "dtype": dtype, "remat": remat, "accum": accumulation,
         "kept MiB": kept_activation_bytes(model, labels, param_shapes,
                                           args.batch_size // accumulation, args) / 2 ** 20,
         "temp GiB": memory.temp_size_in_bytes / GIB,
         "args GiB": memory.argument_size_in_bytes / GIB, "peak GiB": peak / GIB,
         "GFLOP": (compiled.cost_analysis()["flops"] / 1e9 if accumulation == 1
                   else float("nan")),
         "compile s": compile_seconds,
         "s/step": float("nan")}
  if args.time_steps:
    row["s/step"] = time_steps(compiled, model, tx, args)
  return row


def time_steps(compiled, model, tx, args) -> float:
  """Median seconds of ``args.time_steps`` steps after one warm-up, on random data."""
  params = factory.init_variables(model, args.image_size, 0)["params"]
  state = {"step": jnp.zeros([], jnp.int32), "params": params,
           "opt_state": jax.jit(tx.init)(params)}
  batch = bench_lib.random_batch(args.batch_size, args.image_size, args.num_classes)

  def call():
    nonlocal state
    state, metrics = compiled(state, batch, jax.random.key(0))
    return metrics
  return bench_lib.median_seconds(call, args.time_steps)


def main(argv=None):
  args = parse_args(argv)
  xla_cpu.use_scheduler(args.cpu_scheduler)
  print(f"{args.method}, {args.num_prompts} prompts, {args.attention} attention, "
        f"{args.image_size} px, global batch "
        f"{args.batch_size}, {jax.device_count()} {jax.devices()[0].platform} device(s); "
        + (f"median of {args.time_steps} timed steps" if args.time_steps
           else "compile only (--time_steps N to time)")
        + (f"; XLA:CPU {args.cpu_scheduler} scheduler" if jax.default_backend() == "cpu"
           else ""), flush=True)
  columns = ["variant", "dtype", "remat", "accum", "kept MiB", "temp GiB", "args GiB",
             "peak GiB",
             "temp vs first", "GFLOP", "compile s", "s/step", "time vs first"]
  bench_lib.print_table_header(columns)
  for variant in args.variants.split(","):
    first = None
    for dtype, remat, accumulation in itertools.product(
        args.dtypes.split(","), args.remats.split(","),
        [int(k) for k in args.accumulations.split(",")]):
      row = measure(args, variant, remat, dtype, accumulation)
      first = first or row  # ratios against the variant's first combination
      row["temp vs first"] = row["temp GiB"] / first["temp GiB"]
      row["time vs first"] = row["s/step"] / first["s/step"]
      print(bench_lib.table_row(str(row[c]) if isinstance(row[c], int) else row[c]
                                for c in columns), flush=True)


if __name__ == "__main__":
  main()
