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
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from configs import common  # pylint: disable=g-import-not-at-top
from vpt_jax.models import factory  # pylint: disable=g-import-not-at-top
from vpt_jax.models import methods  # pylint: disable=g-import-not-at-top
from vpt_jax.training import optimizers  # pylint: disable=g-import-not-at-top
from vpt_jax.training import partition  # pylint: disable=g-import-not-at-top
from vpt_jax.training import steps  # pylint: disable=g-import-not-at-top

NORM = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--num_prompts", type=int, default=50)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--methods", default="vpt_deep,vpt_shallow,cvpt,linear,full,partial-1,"
                      "bias,adapter,lora")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
  parser.add_argument("--no_skip", action="store_true",
                      help="also time the plain formulation (skip_dead_work=False)")
  return parser.parse_args(argv)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
  """Dense float32 (size x size) @ (size x size) throughput, median of repeats."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / statistics.median(times) / 1e9


def measure(method: str, args, skip_dead_work: bool) -> dict:
  """Times one method's train step; returns a row of the table."""
  config = common.base_config()
  common.apply_method(config, method)
  config.model.variant = args.variant
  config.model.image_size = args.image_size
  config.model.skip_dead_work = skip_dead_work
  config.prompt.num_prompts = args.num_prompts
  spec = factory.model_spec(config)
  model = factory.build_model(spec, args.num_classes)
  params = factory.init_variables(model, args.image_size, 0)["params"]
  labels = partition.label_params(params, factory.trainable_rules(config))
  schedule = lambda step: 0.01
  tx = optimizers.make_optimizer(
      labels, name=config.optim.name or methods.get_method(method).optimizer,
      learning_rate=schedule, weight_decay=1e-4)
  state = {"step": jnp.zeros([], jnp.int32), "params": params, "opt_state": tx.init(params)}
  rng = np.random.default_rng(0)
  size = args.image_size
  batch = {"image": rng.integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8),
           "label": rng.integers(0, args.num_classes, (args.batch_size,)).astype(np.int32)}
  step_fn = jax.jit(steps.make_train_step(model, labels, tx, schedule, **NORM),
                    donate_argnums=(0,))
  began = time.perf_counter()
  compiled = step_fn.lower(state, batch, jax.random.key(0)).compile()
  compile_seconds = time.perf_counter() - began
  flops = compiled.cost_analysis()["flops"]
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]))
  state, metrics = compiled(state, batch, jax.random.key(0))
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, jax.random.key(0))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"method": method + ("" if skip_dead_work else " (plain)"),
          "s/step": seconds, "img/s": args.batch_size / seconds, "GFLOP": flops / 1e9,
          "GFLOP/s": flops / 1e9 / seconds, "compile s": compile_seconds,
          "opt state MB": opt_bytes / 2**20,
          "peak RSS GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None):
  args = parse_args(argv)
  ceiling = matmul_gflops()
  print(f"dense float32 matmul 2048^3: {ceiling:.1f} GFLOP/s; {args.variant} at "
        f"{args.image_size} px, batch {args.batch_size}, {args.num_prompts} prompts, "
        f"median of {args.steps} steps", flush=True)
  columns = ["method", "s/step", "img/s", "GFLOP", "GFLOP/s", "% of matmul", "compile s",
             "opt state MB", "peak RSS GB"]
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for method in args.methods.split(","):
    for skip in ((True, False) if args.no_skip and methods.get_method(method).uses_prompts
                 else (True,)):
      row = measure(method, args, skip)
      row["% of matmul"] = 100 * row["GFLOP/s"] / ceiling
      print("| " + " | ".join(
          row[c] if isinstance(row[c], str) else f"{row[c]:.3g}" for c in columns) + " |",
            flush=True)


if __name__ == "__main__":
  main()
