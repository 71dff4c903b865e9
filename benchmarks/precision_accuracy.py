r"""Test accuracy of every method in float32 and in bfloat16 on the quickstart's tasks.

Runs the quickstart suite (``configs/quickstart.py``: the shipped sprites-pretrained
``nano/8`` ViT, its three 1,000-image tasks) twice, ``model.dtype=float32`` and
``model.dtype=bfloat16``, with every registry method as a run (the quickstart's
tuned learning rate where it has one, else ``quickstart.UNTUNED_BASE_LRS`` of the
method's optimizer), and prints one table: task x method, both accuracies, their
difference and each run's wall time. Both dtypes use the same seed, epochs and
hyper-parameters, so the difference is bfloat16's alone (plus the chaotic
divergence of two training trajectories that start to differ at the first step).

  nice python benchmarks/precision_accuracy.py --workdir /tmp/bf16_accuracy
  python benchmarks/precision_accuracy.py --workdir /tmp/b --epochs 1 --tasks count \
      --methods vpt_deep,full                                  # a one-minute smoke run

The runs go into ``WORKDIR/<dtype>/<task>/<method>``, pair by pair (float32 then
bfloat16 of one method before the next), and are reused by a rerun (the suite
resumes). One process, single-threaded XLA (the machine is shared):
each run is small, and one core keeps it busy.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import quickstart as quickstart_config  # pylint: disable=g-import-not-at-top
from vpt_jax.methods import registry  # pylint: disable=g-import-not-at-top
from vpt_jax.suites import quickstart  # pylint: disable=g-import-not-at-top

DTYPES = ("float32", "bfloat16")
# Of the "name-k" families one k each (the others differ only in how many blocks
# or head layers train): partial-1 and mlp-3.
SKIPPED = {"partial-2": "partial-1 stands for partial-k",
           "partial-4": "partial-1 stands for partial-k",
           "mlp-2": "mlp-3 stands for mlp-k", "mlp-5": "mlp-3 stands for mlp-k",
           "mlp-9": "mlp-3 stands for mlp-k"}


def all_methods() -> list[str]:
  """Every registry method that runs on the suite's ViT, minus the ``SKIPPED`` ones."""
  return [name for name in registry.METHODS if name not in SKIPPED]


def suite_config(dtype: str, epochs: int, tasks, methods, seed: int = 42):
  """The quickstart suite cut to ``epochs`` (warm-up a tenth, as 1.5 of 15), one process."""
  suite = quickstart_config.get_config()
  suite.unlock()
  suite.workers = 1
  suite.task_order = tuple(tasks)
  suite.run_order = tuple(methods)
  suite.base.model.dtype = dtype
  suite.base.seed = seed
  suite.base.optim.epochs = epochs
  suite.base.optim.warmup_epochs = epochs / 10
  suite.base.export.enabled = False  # the exports are not measured
  suite.lock()
  return suite


def format_table(by_dtype: dict) -> str:
  """The markdown table: task x method, accuracies, bfloat16 - float32, seconds of each run."""
  lines = ["| task | method | float32 | bfloat16 | bf16 - f32 | s float32 | s bfloat16 |",
           "|---|---|---|---|---|---|---|"]
  bf16_rows = {(r["task"], r["method"]): r for r in by_dtype["bfloat16"]}
  diffs = []
  for row in by_dtype["float32"]:
    other = bf16_rows[(row["task"], row["method"])]
    diff = other["accuracy"] - row["accuracy"]
    diffs.append((abs(diff), row["task"], row["method"]))
    lines.append(f"| {row['task']} | {row['method']} | {row['accuracy']:.3f} | "
                 f"{other['accuracy']:.3f} | {diff:+.3f} | {row['seconds']:.0f} | "
                 f"{other['seconds']:.0f} |")
  worst = max(diffs)
  mean = sum(d for d, _, _ in diffs) / len(diffs)
  lines.append(f"\nmax |bf16 - f32| {worst[0]:.3f} ({worst[1]} / {worst[2]}); "
               f"mean |bf16 - f32| {mean:.4f} over {len(diffs)} runs")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--epochs", type=int, default=5,
                      help="per run, both dtypes (the quickstart trains 15)")
  parser.add_argument("--tasks", default="count,lowest_y,digits")
  parser.add_argument("--methods", default="", help="comma-separated; default every method")
  parser.add_argument("--seed", type=int, default=42,
                      help="config.seed of every run; another seed measures float32's own spread")
  args = parser.parse_args(argv)
  # Before JAX computes anything: XLA reads its flags at its first use.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                             + quickstart.SINGLE_THREADED_XLA).strip()
  methods = args.methods.split(",") if args.methods else all_methods()
  for name, reason in SKIPPED.items():
    if name not in methods:
      print(f"skipped {name}: {reason}")
  by_dtype = {dtype: [] for dtype in DTYPES}
  for task in args.tasks.split(","):
    for method in methods:  # both dtypes of a pair in turn: an interrupted benchmark has pairs
      for dtype in DTYPES:
        suite = suite_config(dtype, args.epochs, [task], [method], args.seed)
        by_dtype[dtype] += quickstart.run_suite(suite, os.path.join(args.workdir, dtype))
  print("\n" + format_table(by_dtype))


if __name__ == "__main__":
  main()
