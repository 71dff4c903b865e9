r"""Training-step cost per method: time, compiled FLOPs and the matmul ceiling.

For each method the library's own jitted train step (trainer's optimizer,
partitioned state, donated buffers) runs on random weights and random uint8
images: compile, one warm-up step, then the median of ``--steps`` timed steps.
The compiled step's FLOPs come from XLA's ``cost_analysis()``; the achieved
GFLOP/s is compared with a dense float32 matmul measured in the same process,
on the same machine, right before (the practical ceiling of this CPU).

  python benchmarks/train_step.py                                   # B/16, 224 px, batch 16
  python benchmarks/train_step.py --methods vpt_deep,full --no_skip # plain formulation too
  python benchmarks/train_step.py --variant test/4 --image_size 32 --steps 3   # smoke run
  python benchmarks/train_step.py --cpu_devices 2            # one XLA device per core
  python benchmarks/train_step.py --methods vpt_deep,cvpt --prompt_counts 1,5,10,50,100,200
  python benchmarks/train_step.py --eval                     # inference throughput
  python benchmarks/train_step.py --methods vpt_deep,vpt_deep:all  # vs full FT, same length
  python benchmarks/train_step.py --methods full --json      # one JSON line per row, no table

With ``--cpu_devices N`` the batch is split over N CPU devices exactly as over
a pod's chips (the same mesh code as training).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import common as bench_lib  # pylint: disable=g-import-not-at-top
from vpt_jax.methods import registry  # pylint: disable=g-import-not-at-top
from vpt_jax.training import mesh  # pylint: disable=g-import-not-at-top
from vpt_jax.training import steps  # pylint: disable=g-import-not-at-top
from vpt_jax.training import xla_cpu  # pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  parser = bench_lib.model_arguments(__doc__)
  parser.add_argument("--methods", default="vpt_deep,vpt_shallow,cvpt,linear,full,partial-1,"
                      "bias,adapter,lora,houlsby,adaptformer,adapter_plus,convpass,"
                      "ssf,difffit,ln_tune,fact_tt,fact_tk,repadapter,vqt,vfpt,e2vpt")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
  parser.add_argument("--prompt_counts", default="",
                      help="comma-separated prompt counts: one row per method and count "
                           "(VPT-deep versus CVPT as the prompts grow)")
  parser.add_argument("--eval", action="store_true",
                      help="time the evaluation (inference) step instead of training")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="on CPU, expose this many XLA devices (one per core) and shard "
                           "the batch over them, as on a pod (0 = JAX's default, one device)")
  parser.add_argument("--cpu_scheduler", choices=xla_cpu.SCHEDULERS, default="memory",
                      help="XLA:CPU's instruction scheduler (the command line's default: "
                           "memory); XLA_FLAGS that choose one win")
  parser.add_argument("--shard_state", action="store_true",
                      help="split the optimizer state over the devices (optim.shard_state, "
                           "ZeRO-1) instead of replicating it")
  parser.add_argument("--no_skip", action="store_true",
                      help="also time the plain formulation (skip_dead_work=False)")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON line per row (with the batch, device count and "
                           "matmul ceiling) instead of the table (benchmarks/side_by_side.py)")
  return parser.parse_args(argv)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
  """Dense float32 (size x size) @ (size x size) throughput, median of repeats."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  return 2 * size ** 3 / bench_lib.median_seconds(lambda: matmul(a), repeats) / 1e9


def run_steps(step: dict, count: int, arguments=None) -> tuple:
  """Calls a ``build_step`` result ``count`` times; returns the next arguments.

  The train step donates its state, so the new state is fed back in.
  """
  arguments = step["arguments"] if arguments is None else arguments
  for _ in range(count):
    outputs = step["compiled"](*arguments)
    jax.block_until_ready(outputs)
    if step["carry_state"]:
      arguments = (outputs[0],) + tuple(arguments[1:])
  return arguments


def median_seconds(step: dict, count: int) -> float:
  """Median seconds of ``count`` calls after one warm-up call."""
  arguments = step["arguments"]

  def call():
    nonlocal arguments
    arguments = run_steps(step, 1, arguments)
  return bench_lib.median_seconds(call, count)


def build_step(method: str, args, skip_dead_work: bool, num_prompts: int) -> dict:
  """One method's compiled train (or eval) step and its arguments, on the mesh.

  Returns a dict with "compiled", "arguments" (a tuple), "carry_state" (the
  step returns a new state to feed back), "opt_bytes" and "compile_seconds".
  """
  # "vpt_deep:all" = the prompted model with every parameter trainable: full
  # fine-tuning's cost at VPT-deep's sequence length.
  method, _, scope = method.partition(":")
  config = bench_lib.method_config(method, args.variant, args.image_size, num_prompts)
  if scope == "all":
    config.trainable_rules = ((".*", "train"),)
  config.model.skip_dead_work = skip_dead_work
  bench_lib.apply_kernel_arguments(config, args)
  model, variables, labels, tx, schedule = bench_lib.setup(config, args.num_classes)
  params = variables["params"]
  data_mesh = mesh.make_data_mesh()
  batch = bench_lib.random_batch(args.batch_size, args.image_size, args.num_classes)
  if args.eval:
    state = mesh.put_replicated({"params": params}, data_mesh)
    batch["mask"] = np.ones((args.batch_size,), bool)
    step_fn = jax.jit(steps.make_eval_step(model, **bench_lib.IMAGENET_NORM))
    arguments = (state, mesh.global_batch(data_mesh, batch))
    opt_bytes = 0
  else:
    state = mesh.place_train_state(tx.init, mesh.put_replicated(params, data_mesh), params,
                                   data_mesh, shard_optimizer=args.shard_state)
    step_fn = mesh.jit_train_step(
        steps.make_train_step(model, labels, tx, schedule, **bench_lib.IMAGENET_NORM),
        data_mesh, state_shardings=mesh.shardings_of(state))
    arguments = (state, mesh.global_batch(data_mesh, batch), jax.random.key(0))
    # One device's share: with --shard_state each holds a slice of most leaves.
    # (From shapes: a shard's .data would be a second reference to the buffer,
    # and a referenced buffer cannot be donated to the first step.)
    opt_bytes = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                    for x in jax.tree.leaves(state["opt_state"]))
  began = time.perf_counter()
  compiled = step_fn.lower(*arguments).compile()
  return {"compiled": compiled, "arguments": arguments, "carry_state": not args.eval,
          "opt_bytes": opt_bytes, "compile_seconds": time.perf_counter() - began}


def measure(method: str, args, skip_dead_work: bool, num_prompts: int) -> dict:
  """Times one method's train (or eval) step; returns a row of the table."""
  step = build_step(method, args, skip_dead_work, num_prompts)
  # cost_analysis() counts one device's program; the batch is split over all.
  flops = step["compiled"].cost_analysis()["flops"] * jax.device_count()
  seconds = median_seconds(step, args.steps)
  memory = step["compiled"].memory_analysis()
  # What one device holds while the step runs (an accelerator's figure):
  # temp + arguments + outputs not written into donated arguments.
  compiled_bytes = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                    + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  return {"method": method + ("" if skip_dead_work else " (plain)"), "prompts": num_prompts,
          "s/step": seconds, "img/s": args.batch_size / seconds, "GFLOP": flops / 1e9,
          "GFLOP/s": flops / 1e9 / seconds, "compile s": step["compile_seconds"],
          "opt state MB": step["opt_bytes"] / 2**20, "compiled GiB": compiled_bytes / 2**30,
          "peak RSS GB": bench_lib.peak_rss_bytes() / 2**30}


def main(argv=None):
  args = parse_args(argv)
  xla_cpu.use_scheduler(args.cpu_scheduler)
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  ceiling = matmul_gflops()
  if not args.json:  # --json prints the rows only
    print(f"{'eval' if args.eval else 'train'} step; "
          f"dense float32 matmul 2048^3: {ceiling:.1f} GFLOP/s; {args.variant} at "
          f"{args.image_size} px, batch {args.batch_size}, {args.num_prompts} prompts, "
          f"{args.dtype}, {args.attention} attention, "
          f"median of {args.steps} steps, {jax.device_count()} device(s)", flush=True)
  columns = ["method", "prompts", "s/step", "img/s", "GFLOP", "GFLOP/s", "% of matmul",
             "compile s", "opt state MB", "compiled GiB", "peak RSS GB"]
  if not args.json:
    bench_lib.print_table_header(columns)
  counts = [int(c) for c in args.prompt_counts.split(",")] if args.prompt_counts else [
      args.num_prompts]
  def prompted(method):
    return registry.get_method(method.partition(":")[0]).uses_prompts
  rows = [(method, skip, count) for count in counts for method in args.methods.split(",")
          for skip in ((True, False) if args.no_skip and prompted(method) else (True,))]
  for method, skip, count in rows:
    row = measure(method, args, skip, count)
    row["% of matmul"] = 100 * row["GFLOP/s"] / ceiling
    if args.json:
      print(json.dumps({**row, "batch": args.batch_size, "devices": jax.device_count(),
                        "matmul GFLOP/s": ceiling}), flush=True)
    else:
      print(bench_lib.table_row(row[c] for c in columns), flush=True)


if __name__ == "__main__":
  main()
