r"""Startup and compile time of a run, with an empty and then a warm compilation cache.

Runs the same child process twice against one fresh cache directory: the
first compiles and writes the cache, the second reads it. Each child imports
the library, builds the model (random weights), and compiles the library's
jitted train step and eval step (``lower().compile()``: what a run's first
step and first evaluation wait for), then runs one train step.

  python benchmarks/compile_cache.py                                  # ViT-B/16 VPT-deep
  python benchmarks/compile_cache.py --variant nano/8 --image_size 32 --num_prompts 10
  python benchmarks/compile_cache.py --no_cache        # both runs compile (the baseline)
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def parse_args(argv=None):
  import common as bench_lib  # jax and the library: counted in the child's "imports"
  parser = bench_lib.model_arguments(__doc__)
  parser.add_argument("--method", default="vpt_deep")
  parser.add_argument("--no_cache", action="store_true", help="cache off in both runs")
  parser.add_argument("--child", default=None, help="(internal) run one child on this cache dir")  # the cache dir
  return parser.parse_args(argv)


def child(args) -> dict:
  """One run's phases in seconds (imports counted from interpreter start of this script)."""
  import jax
  import numpy as np
  import common as bench_lib
  from vpt_jax.training import compile_cache
  from vpt_jax.training import mesh
  from vpt_jax.training import steps
  compile_cache.configure(args.child or None)
  times = {"imports": time.perf_counter() - STARTED}
  began = time.perf_counter()
  config = bench_lib.method_config(args.method, args.variant, args.image_size, args.num_prompts)
  bench_lib.apply_kernel_arguments(config, args)
  model, variables, labels, tx, schedule = bench_lib.setup(config, args.num_classes)
  data_mesh = mesh.make_data_mesh()
  params = variables["params"]
  state = mesh.put_replicated(
      {"step": np.zeros([], np.int32), "params": params, "opt_state": tx.init(params)},
      data_mesh)
  batch = mesh.global_batch(data_mesh, bench_lib.random_batch(
      args.batch_size, args.image_size, args.num_classes))
  times["model init"] = time.perf_counter() - began
  began = time.perf_counter()
  train = jax.jit(steps.make_train_step(model, labels, tx, schedule,
                                        **bench_lib.IMAGENET_NORM), donate_argnums=(0,))
  compiled = train.lower(state, batch, jax.random.key(0)).compile()
  times["compile train"] = time.perf_counter() - began
  began = time.perf_counter()
  eval_batch = mesh.global_batch(data_mesh, dict(
      bench_lib.random_batch(args.batch_size, args.image_size, args.num_classes),
      mask=np.ones((args.batch_size,), bool)))
  jax.jit(steps.make_eval_step(model, **bench_lib.IMAGENET_NORM)).lower(
      {"params": state["params"]}, eval_batch).compile()
  times["compile eval"] = time.perf_counter() - began
  began = time.perf_counter()
  jax.block_until_ready(compiled(state, batch, jax.random.key(0)))
  times["one step"] = time.perf_counter() - began
  return times


def run_twice(args) -> list[dict]:
  """Both runs' phases and wall seconds (process start to exit), one shared cache dir."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="vpt_jax_cache_bench_") as cache:
    for label in ("first (empty cache)", "second (warm cache)"):
      began = time.perf_counter()
      out = subprocess.run(
          [sys.executable, __file__, f"--child={'' if args.no_cache else cache}",
           f"--variant={args.variant}", f"--image_size={args.image_size}",
           f"--batch_size={args.batch_size}", f"--num_prompts={args.num_prompts}",
           f"--num_classes={args.num_classes}", f"--method={args.method}",
           f"--attention={args.attention}", f"--dtype={args.dtype}"],
          capture_output=True, text=True, check=True)
      times = json.loads(out.stdout.strip().splitlines()[-1])
      rows.append({"run": label, "process wall": time.perf_counter() - began, **times})
    entries = sum(len(files) for _, _, files in os.walk(cache))
  print(f"{args.method} {args.variant} at {args.image_size} px, batch {args.batch_size}, "
        f"{args.num_prompts} prompts; cache {'off' if args.no_cache else 'on'} "
        f"({entries} files after both runs)")
  return rows


def main(argv=None):
  args = parse_args(argv)
  if args.child is not None:
    print(json.dumps(child(args)))
    return
  rows = run_twice(args)
  columns = ["run", "process wall", "imports", "model init", "compile train", "compile eval",
             "one step"]
  print("| " + " | ".join(columns[:1] + [c + " s" for c in columns[1:]]) + " |")
  print("|" + "---|" * len(columns))
  for row in rows:
    print("| " + " | ".join([row["run"]] + [f"{row[c]:.1f}" for c in columns[1:]]) + " |")


if __name__ == "__main__":
  main()
