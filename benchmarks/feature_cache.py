r"""Head-only training with and without the feature cache: a 100-epoch VTAB-1k-style run.

VTAB-1k trains on 1,000 images for 100 epochs. A head-only method (linear,
mlp-k) leaves the backbone frozen and the inputs unaugmented, so the trainer
computes the backbone features once and trains the head on them
(``feature_cache.uses_cached_features``); this script measures what that saves, with
the library's own train step and feature extraction:

* uncached: every step runs the frozen backbone on the batch's images (what
  any other method does); a few epochs are timed after compilation and the
  100-epoch time is extrapolated (``--measure_epochs``; ``--measure_epochs 100``
  runs them all);
* cached: ``feature_cache.compute_features`` once, then all 100 epochs of head steps.

Compile time is reported separately and excluded from the per-epoch figures.
The backbone has random weights (speed does not depend on the values).

  python benchmarks/feature_cache.py                      # micro/4, 32 px, linear
  python benchmarks/feature_cache.py --variant Ti/16 --image_size 224 --method mlp-3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

import common as bench_lib  # pylint: disable=g-import-not-at-top
from vpt_jax.data import training_stream  # pylint: disable=g-import-not-at-top
from vpt_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
from vpt_jax.training import steps  # pylint: disable=g-import-not-at-top
from vpt_jax.training import feature_cache  # pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="micro/4")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--method", default="linear", help="a head-only method: linear, mlp-k")
  parser.add_argument("--num_images", type=int, default=1000)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--epochs", type=int, default=100)
  parser.add_argument("--measure_epochs", type=int, default=2,
                      help="uncached epochs actually timed (the rest is extrapolated)")
  return parser.parse_args(argv)


def build(args):
  """Model, backbone-like parameters, labels, optimizer, schedule, data of the benchmark run."""
  config = bench_lib.method_config(args.method, args.variant, args.image_size)
  config.optim.batch_size = args.batch_size
  model, variables, labels, tx, schedule = bench_lib.setup(config, args.num_classes)
  if not feature_cache.uses_cached_features(config, labels):
    raise SystemExit(f"{args.method} is not head-only; the feature cache does not apply")
  data = bench_lib.random_batch(args.num_images, args.image_size, args.num_classes)
  return model, variables, labels, tx, schedule, data["image"], data["label"]


def initial_state(variables, tx):
  state = {"step": jnp.zeros([], jnp.int32), "params": variables["params"],
           "opt_state": tx.init(variables["params"])}
  if "batch_stats" in variables:
    state["batch_stats"] = variables["batch_stats"]
  return state


def run_epochs(step_fn, state, inputs: dict, targets, *, batch_size: int, epochs: int,
               start_epoch: int = 0):
  """Runs whole epochs of steps; returns (state, seconds), blocking on the result."""
  steps_per_epoch = len(targets) // batch_size
  batches = training_stream.train_batches(len(targets), global_batch=batch_size, seed=0,
                                          start_step=start_epoch * steps_per_epoch)
  rng = jax.random.key(1)
  began = time.perf_counter()
  for _ in range(epochs * steps_per_epoch):
    indices = next(batches)
    batch = {key: value[indices] for key, value in inputs.items()}
    state, metrics = step_fn(state, {**batch, "label": targets[indices]}, rng)
  jax.block_until_ready(metrics["loss"])
  return state, time.perf_counter() - began


def main(argv=None):
  args = parse_args(argv)
  model, variables, labels, tx, schedule, images, targets = build(args)
  step_fn = jax.jit(steps.make_train_step(model, labels, tx, schedule,
                                          **bench_lib.IMAGENET_NORM))
  rows = []

  # Uncached: the frozen backbone runs in every step.
  began = time.perf_counter()
  state, _ = run_epochs(step_fn, initial_state(variables, tx), {"image": images}, targets,
                        batch_size=args.batch_size, epochs=1)  # compile + warm-up epoch
  warmup = time.perf_counter() - began
  measured = min(args.measure_epochs, args.epochs)
  _, seconds = run_epochs(step_fn, state, {"image": images}, targets,
                          batch_size=args.batch_size, epochs=measured, start_epoch=1)
  per_epoch = seconds / measured
  rows.append(("uncached (backbone every step)", warmup - per_epoch, per_epoch,
               (warmup - per_epoch) + per_epoch * args.epochs,
               "" if measured == args.epochs else f"extrapolated from {measured} epochs"))

  # Cached: features once, then the head on them.
  began = time.perf_counter()
  features = feature_cache.compute_features(model, variables, images,
                                            mesh_lib.make_data_mesh(), batch_size=256,
                                            norm=bench_lib.IMAGENET_NORM)
  extraction = time.perf_counter() - began
  began = time.perf_counter()
  state, _ = run_epochs(step_fn, initial_state(variables, tx), {"features": features},
                        targets, batch_size=args.batch_size, epochs=1)
  warmup = time.perf_counter() - began
  _, seconds = run_epochs(step_fn, state, {"features": features}, targets,
                          batch_size=args.batch_size, epochs=args.epochs - 1, start_epoch=1)
  per_epoch = seconds / max(args.epochs - 1, 1)
  setup = extraction + warmup - per_epoch
  rows.append(("cached (features once)", setup, per_epoch, setup + per_epoch * args.epochs,
               f"feature extraction {extraction:.1f}s incl. compile"))

  print(f"\n{args.method} on {args.variant} at {args.image_size}px: {args.num_images} images, "
        f"batch {args.batch_size}, {args.epochs} epochs, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)\n")
  print("| path | setup s (compile, features) | s / epoch | total s | note |")
  print("|---|---|---|---|---|")
  for name, setup, epoch, total, note in rows:
    print(f"| {name} | {setup:.1f} | {epoch:.3f} | {total:.1f} | {note} |")
  print(f"\nspeed-up of the {args.epochs}-epoch run: {rows[0][3] / rows[1][3]:.1f}x "
        f"(per epoch: {rows[0][2] / rows[1][2]:.0f}x)")


if __name__ == "__main__":
  main()
