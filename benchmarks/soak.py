r"""Soak test: a long tiny run through the real trainer, watching the process's memory.

Trains a tiny ViT (``test/4`` at 16 px, VPT-deep, local ``vpt_sprites/tiny``)
for many steps with the trainer's own loop, evaluating, checkpointing (orbax,
keeping 2, so old steps are deleted) and exporting periodically, and samples
the resident set size (VmRSS of /proc/self/status) and the number of live JAX
arrays every ``--sample_every`` steps. Prints a table, writes it as CSV, and
ends with a verdict: the median (Theil-Sen) slope of anonymous RSS (RssAnon: heap
and other private memory; the file-backed rest of VmRSS is mostly shared
libraries, whose pages the kernel drops and reloads at will), measured after
``gc.collect()``, in MB per 1000 steps over
the samples after the first ``--skip_fraction`` of the run and after the first
evaluation, checkpoint and export (each allocates once the first time). Exits
with status 1 if the slope exceeds ``--max_slope``.

RSS alone cannot tell a leak from an allocator that keeps freed memory, so
every sample also records what is really in use: the bytes glibc's malloc has
handed out and not had back (``mallinfo2``: the arenas' in-use chunks plus
mmapped chunks; XLA:CPU's buffers and most native state come from malloc), the
bytes it holds free, and the number of blocks Python's own allocator has out
(``sys.getallocatedblocks``). ``--tracemalloc`` also traces Python allocations
from the start of the fitted window and prints the source lines whose
allocations grew most (slow: use it on shorter runs).

  python benchmarks/soak.py                                   # 5000 steps
  python benchmarks/soak.py --steps 50000 --sample_every 500  # the long run
  python benchmarks/soak.py --steps 300 --sample_every 25 --eval_every 100 \
      --checkpoint_every 50 --export_every 100                 # a quick check
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import gc
import os
import resource
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from configs import common  # pylint: disable=g-import-not-at-top
from vpt_jax.training import results  # pylint: disable=g-import-not-at-top
from vpt_jax.training import setup  # pylint: disable=g-import-not-at-top
from vpt_jax.training import trainer  # pylint: disable=g-import-not-at-top

# vpt_sprites/tiny's train split, all in every batch: one step per epoch, so the
# integer epoch fields of the config count steps.
TRAIN_IMAGES = 24


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=5000)
  parser.add_argument("--sample_every", type=int, default=100, help="steps between RSS samples")
  parser.add_argument("--eval_every", type=int, default=500, help="steps between evaluations")
  parser.add_argument("--checkpoint_every", type=int, default=250)
  parser.add_argument("--export_every", type=int, default=1000)
  parser.add_argument("--method", default="vpt_deep")
  parser.add_argument("--variant", default="test/4")
  parser.add_argument("--image_size", type=int, default=16)
  parser.add_argument("--skip_fraction", type=float, default=0.2,
                      help="leading fraction of the run left out of the slope")
  parser.add_argument("--max_slope", type=float, default=1.0,
                      help="MB per 1000 steps above which the verdict is 'grows'")
  parser.add_argument("--workdir", default="", help="default: a new temporary directory")
  parser.add_argument("--csv", default="", help="default: WORKDIR/soak_rss.csv")
  parser.add_argument("--tracemalloc", action="store_true",
                      help="trace Python allocations over the fitted window and print "
                           "the lines that grew most")
  return parser.parse_args(argv)


def memory_mb() -> dict[str, float]:
  """{"rss_mb": VmRSS, "anon_mb": RssAnon} now, in MB.

  Without /proc both are the peak RSS (``ru_maxrss``), which can only grow.
  """
  fields = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
          fields[name] = int(value.split()[0]) / 1024  # kB
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
  rss = fields.get("VmRSS", peak)
  return {"rss_mb": rss, "anon_mb": fields.get("RssAnon", rss)}


class _MallInfo2(ctypes.Structure):
  # glibc's struct mallinfo2 (glibc >= 2.33), every field a size_t.
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


def _mallinfo2():
  """glibc's ``mallinfo2`` as a callable, or None where there is none (musl, macOS)."""
  path = ctypes.util.find_library("c")
  if not path:
    return None
  libc = ctypes.CDLL(path)
  if not hasattr(libc, "mallinfo2"):
    return None
  libc.mallinfo2.restype = _MallInfo2
  return libc.mallinfo2


MALLINFO2 = _mallinfo2()


def heap_mb() -> dict[str, float]:
  """What the allocators have handed out, in MB, and Python's block count.

  {"malloc_used_mb": in-use arena chunks + mmapped chunks, "malloc_free_mb":
  free bytes malloc keeps in its arenas, "python_blocks": pymalloc blocks in
  use}; the malloc fields are NaN without glibc.
  """
  if MALLINFO2 is None:
    used = free = float("nan")
  else:
    info = MALLINFO2()
    used, free = (info.uordblks + info.hblkhd) / 2**20, info.fordblks / 2**20
  return {"malloc_used_mb": used, "malloc_free_mb": free,
          "python_blocks": sys.getallocatedblocks()}


def soak_config(args, workdir: str):
  """A run of exactly ``args.steps`` steps on vpt_sprites/tiny (3 classes by count)."""
  config = common.base_config()
  common.apply_method(config, args.method)
  config.model.variant = args.variant
  config.model.image_size = args.image_size
  config.prompt.num_prompts = 2
  config.model.from_scratch = True  # a random backbone: only memory and speed are measured
  config.data.builder = "vpt_sprites/tiny"
  config.data.data_dir = os.path.join(workdir, "tfds")
  config.data.label_key = "count"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.test_split = "test"
  config.optim.batch_size = TRAIN_IMAGES
  config.optim.epochs = args.steps
  config.optim.warmup_epochs = 1
  config.optim.base_lr = 0.5
  config.eval.batch_size = 8
  config.eval.every_epochs = args.eval_every
  config.checkpoint.every_steps = args.checkpoint_every
  config.checkpoint.keep = 2
  config.log_every_steps = args.sample_every
  config.lock()
  return config


def median_slope(x: np.ndarray, y: np.ndarray) -> float:
  """The Theil-Sen slope: the median of the slopes between all pairs of points.

  Unlike least squares it ignores a one-off jump (memory handed back to the
  system once, a cache filled once) unless most pairs straddle it.
  """
  i, j = np.triu_indices(len(x), k=1)
  return float(np.median((y[j] - y[i]) / (x[j] - x[i])))


def fit_start(args) -> int:
  """The first step of the fitted window (see ``verdict``), on a sample step."""
  # Events that never happen in the run (an interval beyond --steps) do not delay it.
  start = max([args.skip_fraction * args.steps] + [
      every for every in (args.eval_every, args.checkpoint_every, args.export_every)
      if every <= args.steps])
  return int(-(-start // args.sample_every) * args.sample_every)


def verdict(samples: list[dict], args) -> tuple[float, str]:
  """(slope in MB per 1000 steps after the skipped start, the verdict lines).

  The fit starts once every periodic event (evaluation, checkpoint, export) has
  happened at least once, and not before ``skip_fraction`` of the run: the
  first of each compiles or allocates once. The verdict uses the median
  (Theil-Sen) slope of anonymous RSS; the least-squares slope is shown too.
  """
  start = fit_start(args)
  kept = [s for s in samples if s["step"] >= start]
  if len(kept) < 3:
    return float("nan"), "too few samples after the skipped start for a slope"
  steps = np.array([s["step"] for s in kept], np.float64)
  anon = np.array([s["anon_mb"] for s in kept], np.float64)
  arrays = np.array([s["live_arrays"] for s in kept], np.float64)
  used = np.array([s["malloc_used_mb"] for s in kept], np.float64)
  blocks = np.array([s["python_blocks"] for s in kept], np.float64)
  slope = median_slope(steps, anon) * 1000
  least_squares = float(np.polyfit(steps, anon, 1)[0]) * 1000
  grows = slope > args.max_slope
  return slope, (
      f"anonymous RSS over steps {int(steps[0])}-{int(steps[-1])} ({len(kept)} samples): "
      f"{anon[0]:.1f} -> {anon[-1]:.1f} MB, median slope {slope:+.3f} MB per 1000 steps "
      f"(least squares {least_squares:+.3f})\n"
      f"live JAX arrays {int(arrays.min())}-{int(arrays.max())}, median slope "
      f"{median_slope(steps, arrays) * 1000:+.2f} per 1000 steps\n"
      f"malloc in use {used[0]:.1f} -> {used[-1]:.1f} MB, median slope "
      f"{median_slope(steps, used) * 1000:+.3f} MB per 1000 steps\n"
      f"Python blocks {int(blocks[0])} -> {int(blocks[-1])}, median slope "
      f"{median_slope(steps, blocks) * 1000:+.1f} per 1000 steps\n"
      + (f"verdict: GROWS (above {args.max_slope} MB per 1000 steps)" if grows
         else f"verdict: no growth (at most {args.max_slope} MB per 1000 steps)"))


def main(argv=None) -> int:
  args = parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="vpt_soak_")
  csv_path = args.csv or os.path.join(workdir, "soak_rss.csv")
  config = soak_config(args, workdir)
  began = time.perf_counter()
  samples = []

  def sample(step: int, phase: str = "train") -> None:
    # Collect garbage cycles first: memory only a later collection would free
    # (e.g. of finished evaluation pipelines) is not a leak.
    gc.collect()
    samples.append({"step": step, "phase": phase, **memory_mb(), **heap_mb(),
                    "live_arrays": len(jax.live_arrays()),
                    "elapsed_s": time.perf_counter() - began})

  run = setup.setup_run(config, os.path.join(workdir, "run"))
  if run.total_steps != args.steps or run.step:
    raise SystemExit(f"the run has {run.total_steps} steps from step {run.step}; "
                     f"expected {args.steps} from 0 (use a new --workdir)")
  exports = 0
  trace_from = fit_start(args)
  traced = {}

  def on_step(step: int, state: dict) -> None:
    nonlocal exports
    if args.tracemalloc and step == trace_from:
      gc.collect()
      tracemalloc.start(8)
      traced["start"] = tracemalloc.take_snapshot()
    if step % args.export_every == 0:
      run.state = state  # the current parameters; read before the next step donates them
      results.export(run)
      exports += 1
    if step % args.sample_every == 0:
      sample(step)

  try:
    sample(0)
    trainer.train(run, on_step=on_step)
    trainer.finish(run)
  finally:
    setup.close(run)
  sample(args.steps, "final")  # after the test evaluation, the export and closing
  if "start" in traced:
    gc.collect()
    growth = tracemalloc.take_snapshot().compare_to(traced["start"], "traceback")
    tracemalloc.stop()
    print(f"\nPython allocations that grew most from step {trace_from} to the end:")
    for stat in growth[:10]:
      print(f"  {stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks")
      for line in stat.traceback.format()[-6:]:
        print(f"      {line}")

  print(f"\n{'step':>8}{'phase':>7}{'RSS MB':>10}{'anon MB':>10}{'malloc used':>13}"
        f"{'malloc free':>13}{'Py blocks':>11}{'live arrays':>13}{'elapsed s':>11}")
  for s in samples:
    print(f"{s['step']:>8}{s['phase']:>7}{s['rss_mb']:>10.1f}{s['anon_mb']:>10.1f}"
          f"{s['malloc_used_mb']:>13.1f}{s['malloc_free_mb']:>13.1f}{s['python_blocks']:>11}"
          f"{s['live_arrays']:>13}{s['elapsed_s']:>11.1f}")
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(samples[0]))
    writer.writeheader()
    writer.writerows(samples)
  slope, line = verdict(samples[:-1], args)  # the slope covers training steps only
  print(f"\n{args.steps} steps, {exports} periodic exports, checkpoints every "
        f"{args.checkpoint_every}, evaluation every {args.eval_every}; workdir {workdir}")
  print(f"CSV: {csv_path}")
  print(line)
  return 1 if slope > args.max_slope else 0


if __name__ == "__main__":
  sys.exit(main())
