r"""Fused sweeps: settings per hour with k settings in one program versus one by one.

The tuning protocol trains up to 40 (lr, weight decay) settings of a task on
one frozen backbone. ``vpt_jax.training.sweeps`` trains k of them in one
compiled step (vmap over prompts, head and optimizer state; backbone, batch and
dropout rng shared). This script times, on random weights and random uint8
images:

* one by one: the trainer's own jitted step (``steps.make_train_step``, one
  setting, constants for lr and decay);
* fused: ``sweep_steps.make_fused_train_step`` with k settings (default 1, 4, 8);

each compiled first, one warm-up step, then the median of ``--steps`` steps.
Settings per hour = 3600 * k / (steps per run * seconds per fused step), with
steps per run = ceil(epochs * train images / batch) (default 100 epochs of
VTAB-1k's 800 images). The XLA cost analysis gives FLOPs and bytes accessed
per step. Fusing k settings needs about k times the activation memory of one
(like a k times larger batch): watch the peak RSS column.

On paper, for an accelerator (``--peak_tflops``, ``--hbm_gbps``; defaults: one
TPU v5e core, 197 bf16 TFLOP/s and 819 GB/s): per setting and step the frozen
backbone's weights are read at least ``reads`` times (forward and, for methods
whose gradient flows through the backbone, backward) = reads * W bytes, and the
step does F FLOPs. A roofline bound is t1 >= max(F / peak, reads * W / hbm)
one by one and t_k >= max(k F / peak, reads * W / hbm) fused, so fusing gains
at most k * max(F/peak, M) / max(k F/peak, M). Equivalently: each weight
element meets ``rows`` = batch x tokens rows per matmul; when rows exceed the
ridge point peak / hbm (in FLOPs per byte, bytes per weight counted), the
matrix units are the bottleneck already and fusing saves only per-step fixed
costs (dispatch, the optimizer update, small head matmuls). ViT-B/16 at 224 px
with 50 prompts has 247 tokens, so batch 16 gives 3,952 rows per matmul, far
above v5e's ridge point of ~240 rows (bf16): a VPT-deep step (1,130 GFLOP,
benchmarks/README.md) takes >= 5.7 ms of matrix work, while reading the 172 MB
of bf16 backbone weights twice takes 0.42 ms, so the bound on the step-time
speed-up is 1.0x at any k. The matrix units are not idle at batch 16; they
would be below ~240 / 247 = 1 image per step, or for small models at small
images.

What fusing saves on any device is what each run pays once: compiling the
train and eval steps (tens of seconds for B/16), loading the backbone,
decoding the data, and per step the host's batch preparation and transfer
(the batch is shared). A VTAB-1k run is only 625 steps at batch 128 (5,000 at
16), so these fixed costs are a real share of a run on a TPU; the table's
"settings/hour with compile" column counts the train-step compile.

  python benchmarks/fused_sweep.py                                   # B/16, 224 px, batch 16
  python benchmarks/fused_sweep.py --variant test/4 --image_size 16 --batch_size 8 \
      --num_prompts 2 --steps 2 --settings 1,2                       # smoke run
"""

from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

import common as bench_lib  # pylint: disable=g-import-not-at-top
from vpt_jax.methods import registry  # pylint: disable=g-import-not-at-top
from vpt_jax.training import sweep_steps  # pylint: disable=g-import-not-at-top
from vpt_jax.training import optimizers  # pylint: disable=g-import-not-at-top
from vpt_jax.params import freezing
from vpt_jax.params import trees  # pylint: disable=g-import-not-at-top
from vpt_jax.training import steps  # pylint: disable=g-import-not-at-top

# The reference's VPT grid (base lr x wd), cycled to give each fused setting its own values.
GRID = [(lr, wd) for lr in (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
        for wd in (0.01, 0.001, 0.0001, 0.0)]


def parse_args(argv=None):
  parser = bench_lib.model_arguments(__doc__)
  parser.add_argument("--method", default="vpt_deep")
  parser.add_argument("--settings", default="1,4,8", help="k values to fuse")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
  parser.add_argument("--epochs", type=float, default=100, help="of one run (settings/hour)")
  parser.add_argument("--train_images", type=int, default=800)
  parser.add_argument("--peak_tflops", type=float, default=197.0,
                      help="accelerator peak (on paper; default TPU v5e bf16)")
  parser.add_argument("--hbm_gbps", type=float, default=819.0,
                      help="accelerator memory bandwidth (on paper; default TPU v5e)")
  parser.add_argument("--weight_bytes", type=int, default=2,
                      help="bytes per backbone weight on the accelerator (bf16: 2)")
  args = parser.parse_args(argv)
  ks = [int(k) for k in args.settings.split(",")]
  if not ks or min(ks) < 1:
    parser.error(f"--settings must list positive integers, got {args.settings!r}")
  args.ks = sorted(set(ks))  # the distinct k values, ascending
  return args


class Bench:
  """The model, its parameters, labels and a batch, built once."""

  def __init__(self, args):
    config = bench_lib.method_config(args.method, args.variant, args.image_size,
                                     args.num_prompts)
    bench_lib.apply_kernel_arguments(config, args)
    config.optim.batch_size = args.batch_size
    config.optim.epochs = args.epochs
    self.config = config
    built = bench_lib.setup(config, args.num_classes)
    self.model, self.params, self.labels = built.model, built.variables["params"], built.labels
    self.batch = bench_lib.random_batch(args.batch_size, args.image_size, args.num_classes)
    self.steps_per_epoch = args.train_images / args.batch_size
    self.run_steps = math.ceil(args.epochs * self.steps_per_epoch)

  def fresh_params(self):
    """A copy of the parameters (each timed step donates its state)."""
    return jax.tree.map(jnp.copy, self.params)

  def setting_configs(self, k: int) -> list:
    configs = []
    for lr, wd in (GRID[i % len(GRID)] for i in range(k)):
      setting = self.config.copy_and_resolve_references()
      setting.optim.base_lr, setting.optim.weight_decay = lr, wd
      configs.append(setting)
    return configs

  def one_by_one(self):
    """The trainer's step for one setting: (jitted step, state)."""
    lr, wd = GRID[0]
    # The schedule and optimizer setup.build_runs builds, from Python constants.
    tx, schedule = sweep_steps.make_setting_optimizer(
        self.config, self.labels, self.steps_per_epoch, decay=wd != 0)(
            optimizers.scaled_learning_rate(lr, self.config.optim.batch_size), wd)
    state = {"step": jnp.zeros([], jnp.int32), "params": self.fresh_params(),
             "opt_state": tx.init(self.params)}
    step = jax.jit(steps.make_train_step(self.model, self.labels, tx, schedule,
                                         **bench_lib.IMAGENET_NORM),
                   donate_argnums=(0,))
    return (lambda s: step(s, self.batch, jax.random.key(0))), step.lower(
        state, self.batch, jax.random.key(0)), state

  def fused(self, k: int):
    """The fused step for k settings: (jitted step, state)."""
    configs = self.setting_configs(k)
    hparams = sweep_steps.setting_hparams(configs)
    make_tx = sweep_steps.make_setting_optimizer(
        self.config, self.labels, self.steps_per_epoch,
        decay=any(c.optim.weight_decay != 0 for c in configs))
    tx, _ = make_tx(hparams["peak_lr"][0], hparams["weight_decay"][0])
    one = {"step": jnp.zeros([], jnp.int32), "params": self.fresh_params(),
           "opt_state": tx.init(self.params)}
    state = sweep_steps.stack_states([one] * k, self.labels)
    step = jax.jit(sweep_steps.make_fused_train_step(self.model, self.labels, make_tx,
                                                     **bench_lib.IMAGENET_NORM),
                   donate_argnums=(0,))
    return (lambda s: step(s, hparams, self.batch, jax.random.key(0))), step.lower(
        state, hparams, self.batch, jax.random.key(0)), state


def time_steps(run, lowered, state, count: int) -> dict:
  """Compiles, then the median seconds of ``count`` steps after one warm-up, and XLA's costs."""
  began = time.perf_counter()
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - began
  cost = compiled.cost_analysis() or {}

  def call():
    nonlocal state
    state, metrics = run(state)
    return metrics
  return {"seconds": bench_lib.median_seconds(call, count), "compile": compile_seconds,
          "flops": float(cost.get("flops", float("nan"))),
          "bytes": float(cost.get("bytes accessed", float("nan"))),
          "rss_gb": bench_lib.peak_rss_bytes() / 2**30}


def on_paper(bench: Bench, args, flops_per_setting: float) -> list[str]:
  """The roofline estimate of fusing on an accelerator (see the module docstring)."""
  frozen = freezing.split(bench.params, bench.labels)[1]
  weights = freezing.count(frozen) * args.weight_bytes
  method = registry.get_method(args.method)
  head_only = all(p.startswith("head/") for p, label in trees.flatten(bench.labels).items()
                  if label == freezing.TRAIN)
  reads = 1 if head_only else 2  # forward; backward too when gradients cross the backbone
  peak, hbm = args.peak_tflops * 1e12, args.hbm_gbps * 1e9
  compute, memory = flops_per_setting / peak, reads * weights / hbm
  tokens = (args.image_size // int(args.variant.split("/")[-1])) ** 2 + 1 + (
      args.num_prompts if method.uses_prompts else 0)
  rows = args.batch_size * tokens
  # Each weight element does 2 FLOPs per row it meets and costs weight_bytes to read.
  ridge_rows = peak / hbm * args.weight_bytes / 2
  verdict = ("compute-bound: the matrix units are busy already" if rows > ridge_rows
             else "weight-read-bound: fusing fills the matrix units")
  lines = [
      f"on paper ({args.peak_tflops:g} TFLOP/s, {args.hbm_gbps:g} GB/s, "
      f"{args.weight_bytes} B/weight): frozen weights {weights / 1e6:.3g} MB read {reads}x per "
      f"step = {1e3 * memory:.3g} ms; {flops_per_setting / 1e9:.4g} GFLOP per setting-step = "
      f"{1e3 * compute:.3g} ms at peak.",
      f"rows per matmul = batch x tokens = {args.batch_size} x {tokens} = {rows}; ridge point "
      f"{peak / hbm:.0f} FLOP/byte = {ridge_rows:.0f} rows ({verdict}).",
      "| k | roofline time per fused step | bound on the step speed-up vs one by one |",
      "|---|---|---|"]
  for k in args.ks:
    fused_time = max(k * compute, memory)
    lines.append(f"| {k} | {fused_time * 1e3:.3g} ms | "
                 f"{k * max(compute, memory) / fused_time:.2f}x |")
  lines.append("The bound ignores per-step fixed costs (dispatch, optimizer update, small "
               "head matmuls), which fusing also shares; measure on the device to see them.")
  return lines


def main(argv=None):
  args = parse_args(argv)
  bench = Bench(args)
  print(f"{args.method}, {args.variant} at {args.image_size} px, batch {args.batch_size}, "
        f"{args.num_prompts} prompts; a run = {bench.run_steps} steps ({args.epochs:g} epochs x "
        f"{args.train_images} images); median of {args.steps} steps on "
        f"{jax.devices()[0].platform}", flush=True)
  columns = ["program", "settings", "s/step", "s/setting-step", "settings/hour", "speed-up",
             "settings/hour with compile", "GFLOP/setting", "GB accessed/setting", "compile s",
             "peak RSS GB"]
  bench_lib.print_table_header(columns)

  def print_row(name: str, k: int, result: dict) -> None:
    per_setting = result["seconds"] / k
    with_compile = 3600 * k / (result["compile"] + bench.run_steps * result["seconds"])
    print(bench_lib.table_row([
        name, k, result["seconds"], per_setting, 3600 / (bench.run_steps * per_setting),
        baseline["seconds"] / per_setting, with_compile, result["flops"] / k / 1e9,
        result["bytes"] / k / 1e9, result["compile"], result["rss_gb"]]), flush=True)

  baseline = time_steps(*bench.one_by_one(), args.steps)
  print_row("one by one", 1, baseline)
  for k in args.ks:
    print_row(f"fused k={k}", k, time_steps(*bench.fused(k), args.steps))
  print()
  print("\n".join(on_paper(bench, args, baseline["flops"])))
  print(f"Per-run fixed costs are paid once per program too: compiling this train step took "
        f"{baseline['compile']:.3g} s here (plus the eval step, the backbone load and the data "
        f"decode), against {bench.run_steps} steps of training; with fixed cost F and step "
        "time t, one by one gives 3600 / (F + steps t) settings/hour, fused k gives "
        "3600 k / (F + steps t_k).")


if __name__ == "__main__":
  main()
