r"""XLA:CPU's library back-ends (oneDNN, XNNPACK, YNNPACK) on the two kernels that bound the step.

The profile of the VPT-deep B/16 step (``profile_step.py``) puts its time in
dense matmuls (projections and MLP, followed by elementwise work such as the
exact GELU) and in attention's batched matmuls, which XLA:CPU runs on one
thread. This times both kernels at the step's shapes under each setting of
XLA_FLAGS; every setting runs in its own process (XLA reads the flags once, at
start-up). A setting that wins here is worth timing on the whole step:

  XLA_FLAGS=--xla_cpu_experimental_xnn_fusion_type=dot \
      python benchmarks/train_step.py --steps 3 --methods vpt_deep

  python benchmarks/xla_cpu_flags.py                 # every setting, median of 20 calls
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# (name, XLA_FLAGS); "" is XLA:CPU's default.
SETTINGS = (
    ("default", ""),
    ("oneDNN thunks", "--xla_cpu_use_onednn=true"),
    ("oneDNN thunks + oneDNN dot fusion",
     "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"),
    ("oneDNN dot + eltwise fusion", "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise"),
    ("XNNPACK dot fusion", "--xla_cpu_experimental_xnn_fusion_type=dot"),
    ("XNNPACK dot, eltwise, reduce fusion",
     "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
    ("XNNPACK greedy graph fusion",
     "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    ("YNNPACK dot fusion", "--xla_cpu_experimental_ynn_fusion_type=dot"),
)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--calls", type=int, default=20, help="timed calls per kernel (median)")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--tokens", type=int, default=247, help="CLS + 196 patches + 50 prompts")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def time_kernels(args) -> tuple[float, float]:
  """(attention-score GFLOP/s, dense + GELU GFLOP/s) in this process's XLA setting.

  Scores: (B, T, 12, 64) x (B, T, 12, 64) -> (B, 12, T, T), as in ViT-B.
  Dense: (B * T, 768) x (768, 3072) then exact GELU, the MLP's first layer.
  """
  # Imported here: the parent process only launches workers and must not start XLA.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import common as bench_lib  # pylint: disable=g-import-not-at-top

  batch, tokens, heads, head_dim, width, hidden = args.batch_size, args.tokens, 12, 64, 768, 3072
  rng = np.random.default_rng(0)
  query, key = (jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim), np.float32))
                for _ in range(2))
  inputs = jnp.asarray(rng.standard_normal((batch * tokens, width), np.float32))
  kernel = jnp.asarray(rng.standard_normal((width, hidden), np.float32))
  scores = jax.jit(lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k))
  dense = jax.jit(lambda x, w: jax.nn.gelu(x @ w, approximate=False))

  score_flops = 2 * batch * heads * tokens * tokens * head_dim
  dense_flops = 2 * batch * tokens * width * hidden
  return (score_flops / bench_lib.median_seconds(lambda: scores(query, key), args.calls) / 1e9,
          dense_flops / bench_lib.median_seconds(lambda: dense(inputs, kernel), args.calls) / 1e9)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker:
    print("%.2f %.2f" % time_kernels(args))
    return 0
  print(f"batch {args.batch_size}, {args.tokens} tokens, ViT-B shapes, one CPU device, "
        f"median of {args.calls} calls")
  print("| setting | XLA_FLAGS | attention scores GFLOP/s | dense + GELU GFLOP/s |")
  print("|---|---|---|---|")
  for name, flags in SETTINGS:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                          f"--calls={args.calls}", f"--batch_size={args.batch_size}",
                          f"--tokens={args.tokens}"],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
      last = (out.stderr.strip().splitlines() or ["no output"])[-1][:80]
      print(f"| {name} | `{flags}` | failed: {last} | |")
      continue
    score_rate, dense_rate = out.stdout.split()[-2:]
    print(f"| {name} | `{flags or '(none)'}` | {score_rate} | {dense_rate} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
