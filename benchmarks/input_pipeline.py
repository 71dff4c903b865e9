r"""Does the input pipeline keep up with the training step?

Prints a table of images per second for the pipeline alone (no model):

* training batches from the decoded uint8 cache: VTAB (a gather) and FGVC
  (random crop + flip, drawn per (seed, step), from a ragged 256-px cache);
* building the training cache: decode + resize of JPEG files;
* evaluation streaming: decode + resize to 224 (VTAB) or resize 256 + centre
  crop (FGVC), padded batches, from a folder of JPEG files this script writes
  (500 x 375, about the size of CUB or DMLab images);

and, with --step, the training step of a ViT-B/16 VPT-deep batch measured once
(random weights; compile excluded), to compare against.

  python benchmarks/input_pipeline.py [--images 512] [--repeats 5] [--step]

Figures are the median over --repeats runs of each measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from configs import common  # pylint: disable=g-import-not-at-top
from vpt_jax.data import eval_stream  # pylint: disable=g-import-not-at-top
from vpt_jax.data import sources  # pylint: disable=g-import-not-at-top
from vpt_jax.data import training_stream  # pylint: disable=g-import-not-at-top

IMAGE_SIZE = 224
BATCH = 128


def write_jpegs(root: str, count: int, size=(375, 500), classes: int = 4) -> str:
  """``count`` JPEGs (quality 90) with smooth content and some noise, in class folders."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:size[0], 0:size[1]]
  for i in range(count):
    base = (np.sin(x / (20 + i % 17)) + np.cos(y / (15 + i % 13))) * 60 + 128
    pixels = base[..., None] + rng.normal(0, 12, size + (3,)) + rng.integers(-40, 40, 3)
    folder = os.path.join(root, f"class{i % classes}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f"{i:05d}.jpg"), quality=90)
  return root


def rate(fn, images_per_call: int, repeats: int) -> float:
  """Median images/s of ``fn`` over ``repeats`` calls (after one warm-up call)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return images_per_call / statistics.median(times)


def train_gather(cache, labels, steps: int, preprocess: str):
  def run():
    batches = training_stream.train_batches(len(labels), global_batch=BATCH, seed=0)
    for step in range(steps):
      training_stream.train_batch(cache, labels, next(batches), image_size=IMAGE_SIZE,
                                  preprocess=preprocess, seed=0, step=step)
  return run


def eval_streaming(source, preprocess: str):
  def run():
    for _ in eval_stream.eval_batches(source, image_size=IMAGE_SIZE, local_batch=BATCH,
                                      preprocess=preprocess):
      pass
  return run


def pipeline_rates(folder: str, count: int, repeats: int) -> list[tuple[str, float]]:
  data = common.base_config().data
  data.task, data.path = "folder", folder
  source = sources.make_source(data, "all")
  rng = np.random.default_rng(1)
  labels = np.zeros(1000, np.int32)
  vtab_cache = rng.integers(0, 256, (1000, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  fgvc_cache = [rng.integers(0, 256, (256, 256 + (i % 7) * 20, 3), dtype=np.uint8)
                for i in range(1000)]
  steps = 8
  rows = [
      ("train batches from the uint8 cache, VTAB (gather)",
       rate(train_gather(vtab_cache, labels, steps, "resize"), steps * BATCH, repeats)),
      ("train batches from the uint8 cache, FGVC (random crop 224 + flip)",
       rate(train_gather(fgvc_cache, labels, steps, "resize_crop_flip"), steps * BATCH,
            repeats)),
      ("training cache build: JPEG decode + resize to 224 (once per run)",
       rate(lambda: training_stream.load_train_set(source, image_size=IMAGE_SIZE), count, repeats)),
      ("eval streaming: JPEG decode + resize to 224 (tf1_bilinear), padded batches",
       rate(eval_streaming(source, "resize"), count, repeats)),
      ("eval streaming: JPEG decode + resize 256 + centre crop 224 (FGVC)",
       rate(eval_streaming(source, "resize_crop_flip"), count, repeats)),
  ]
  return rows


def step_rate(folder: str, batch: int, steps: int) -> tuple[float, float]:
  """(seconds per step, images/s) of a ViT-B/16 VPT-deep train step (median)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import inputs  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import setup  # pylint: disable=g-import-not-at-top
  config = common.base_config()
  config.method, config.model.variant, config.prompt.num_prompts = "vpt_deep", "B/16", 50
  config.data.task, config.data.path, config.data.train_split = "folder", folder, f"all[:{batch}]"
  config.data.num_classes = 0
  config.model.from_scratch = True  # a random backbone: only the step rate is measured
  config.optim.batch_size = batch
  config.lock()
  workdir = tempfile.TemporaryDirectory(prefix="step_bench_")
  run = setup.setup_run(config, workdir.name)
  replicated = mesh_lib.replicated(run.mesh)
  train_step = jax.jit(
      steps_lib.make_train_step(run.model, run.labels, run.tx, run.schedule, **run.norm),
      donate_argnums=(0,), in_shardings=(replicated, mesh_lib.batch_sharded(run.mesh),
                                         replicated),
      out_shardings=(replicated, replicated))
  batch_arrays = mesh_lib.global_batch(run.mesh, next(inputs.batches(run.data, config, 0)))
  rng = jax.jit(lambda: jax.random.key(0), out_shardings=replicated)()
  state = run.state
  start = time.perf_counter()
  state, metrics = train_step(state, batch_arrays, rng)
  jax.block_until_ready(metrics)
  print(f"  (compile + first step: {time.perf_counter() - start:.0f} s)", flush=True)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_step(state, batch_arrays, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  setup.close(run)
  workdir.cleanup()
  seconds = statistics.median(times)
  return seconds, batch / seconds


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=512, help="JPEG files to write")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--step", action="store_true",
                      help="also measure the ViT-B/16 VPT-deep train step (minutes on CPU)")
  parser.add_argument("--step_batch", type=int, default=16)
  parser.add_argument("--step_repeats", type=int, default=3)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="jpegs_") as folder:
    write_jpegs(folder, args.images)
    print(f"{args.images} JPEGs (500 x 375) in {folder}; batch {BATCH}; median of "
          f"{args.repeats} runs", flush=True)
    rows = pipeline_rates(folder, args.images, args.repeats)
    if args.step:
      seconds, images = step_rate(folder, args.step_batch, args.step_repeats)
      rows.append((f"ViT-B/16 VPT-deep train step (batch {args.step_batch}, 224 px, 50 "
                   f"prompts, {seconds:.1f} s/step, median of {args.step_repeats})", images))
  print("\n| stage | images/s |\n|---|---|")
  for name, value in rows:
    print(f"| {name} | {value:,.1f} |")


if __name__ == "__main__":
  main()
