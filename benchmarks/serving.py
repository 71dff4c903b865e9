r"""Many tasks on one backbone: a mixed-task batch versus a single-task batch.

K task exports (VPT-deep by default, with the class counts of the 19 VTAB-1k
tasks) are written with random prompts and heads on a random backbone file
(or on --backbone), loaded into one ``serving.MultiTaskServer``, and a batch
of --batch_size random images is classified three ways:

* plain model, 1 task: the single-task predict path (``load_task_variables``,
  one jitted ``model.apply``; no gathering, no masking);
* server, 1 task: every example names the same task;
* server, K tasks: the examples cycle through all K tasks (one forward pass).

"forward" times the jitted computation alone (inputs already on the device);
"call" times ``server.logits`` as a user calls it (host arrays in, NumPy out).
Each is the median of --runs calls after the compile and one warm-up call.
GFLOP is XLA's count for the compiled forward. Memory: the backbone's
parameter bytes (held once, whatever K), the K exports' bytes, the stacked
task variables (heads padded to the largest class count) and the process RSS
after loading and compiling (and its peak), against K separate single-task
models, which would hold K backbones.

  python benchmarks/serving.py                                  # B/16, 224 px, batch 32
  python benchmarks/serving.py --variant test/4 --image_size 32 --num_prompts 2 \
      --runs 3                                                  # smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import common as bench_lib  # pylint: disable=g-import-not-at-top
from vpt_jax.checkpoints import npz as npz_lib  # pylint: disable=g-import-not-at-top
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.data import vtab_tasks  # pylint: disable=g-import-not-at-top
from vpt_jax.export import serving  # pylint: disable=g-import-not-at-top
from vpt_jax.export import task_export  # pylint: disable=g-import-not-at-top
from vpt_jax.methods import factory  # pylint: disable=g-import-not-at-top
from vpt_jax.methods import registry  # pylint: disable=g-import-not-at-top
from vpt_jax.params import freezing
from vpt_jax.params import trees  # pylint: disable=g-import-not-at-top

NORM = bench_lib.MINUS_ONE_TO_ONE_NORM  # written into the exports' metadata
# The VTAB-1k tasks' class counts, in the VPT paper's order.
VTAB_CLASSES = [task.num_classes for task in vtab_tasks.TASKS.values()]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="B/16")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--num_tasks", type=int, default=19,
                      help="K exports; class counts cycle through VTAB-1k's 19")
  parser.add_argument("--method", default="vpt_deep",
                      help="the exports' method (one that adds parameters, e.g. vpt_deep, "
                           "vpt_shallow, lora, adapter, cvpt, linear)")
  parser.add_argument("--num_prompts", type=int, default=50)
  parser.add_argument("--runs", type=int, default=5, help="timed calls (median)")
  parser.add_argument("--backbone", default="",
                      help="a backbone file of --variant (default: a random one is written)")
  parser.add_argument("--workdir", default="",
                      help="where to write the backbone and exports (default: a temp dir)")
  bench_lib.add_kernel_arguments(parser)
  return parser.parse_args(argv)


def _config(args):
  # --num_prompts only reaches the spec of methods with prompts (and CVPT's).
  config = bench_lib.method_config(args.method, args.variant, args.image_size, args.num_prompts)
  bench_lib.apply_kernel_arguments(config, args)
  return config


def write_random_backbone(path: str, args) -> str:
  """A backbone file of random N(0, 0.02^2) weights in the model's own (Linen) layout."""
  spec = factory.model_spec(_config(args))
  method = registry.get_method(spec["method"])
  model = factory.build_model(spec, 10)
  rng = np.random.default_rng(0)
  # The method's own parameters (head, prompts, ...) are never in a backbone file.
  flat = {name: (rng.standard_normal(shape.shape, np.float32) * 0.02)
          for name, shape in trees.flatten(
              factory.variable_shapes(model, args.image_size)["params"]).items()
          if not any(re.fullmatch(p, name) for p in method.fresh_patterns)}
  npz_lib.save_npz(flat, path)
  return path


def write_exports(directory: str, backbone: str, args) -> dict[str, str]:
  """K exports with random trained leaves, written by the real export function."""
  config = _config(args)
  spec = factory.model_spec(config)
  fingerprint = npz_lib.fingerprint(backbone)
  rules = factory.trainable_rules(config)  # the trainer's, as its exports have
  rng = np.random.default_rng(1)
  exports = {}
  for k in range(args.num_tasks):
    num_classes = VTAB_CLASSES[k % len(VTAB_CLASSES)]
    model = factory.build_model(spec, num_classes)
    shapes = factory.variable_shapes(model, args.image_size)
    labels = freezing.label_params(shapes["params"], rules)
    flat_labels = trees.flatten(labels)
    params = trees.unflatten({
        path: (rng.standard_normal(shape.shape, np.float32) * 0.05
               if flat_labels[path] == freezing.TRAIN else shape)
        for path, shape in trees.flatten(shapes["params"]).items()})
    stats = None
    if "batch_stats" in shapes:
      stats = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes["batch_stats"])
    name = f"task{k:02d}"
    exports[name] = task_export.export_task(
        os.path.join(directory, name), params, labels, spec=spec, num_classes=num_classes,
        class_names=None, normalization=NORM, backbone_path=backbone,
        backbone_fingerprint=fingerprint, init_seed=0, batch_stats=stats)
  return exports


def rss_bytes() -> int:
  """The process's current resident set size (Linux /proc; 0 elsewhere)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return 0


def main(argv=None):
  args = parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="serving_bench_")
  os.makedirs(workdir, exist_ok=True)
  began = time.perf_counter()
  backbone = args.backbone or write_random_backbone(os.path.join(workdir, "backbone.npz"), args)
  exports = write_exports(workdir, backbone, args)
  print(f"wrote {len(exports)} exports in {time.perf_counter() - began:.1f} s", flush=True)

  rss_before = rss_bytes()
  began = time.perf_counter()
  server = serving.MultiTaskServer(exports, backbone)
  load_seconds = time.perf_counter() - began
  if len(server.groups) != 1:
    raise SystemExit(f"expected one structure group, got {len(server.groups)}")
  group = server.groups[0]
  names = list(exports)
  rng = np.random.default_rng(2)
  size = args.image_size
  images = rng.integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
  one_task = [names[0]] * args.batch_size
  mixed = [names[i % len(names)] for i in rng.permutation(args.batch_size)]

  rows = []
  device_images = jax.device_put(images)
  for label, tasks in (("server, 1 task", one_task), (f"server, {len(names)} tasks", mixed)):
    rows_index = jax.device_put(np.asarray([names.index(t) for t in tasks], np.int32))
    # Both batches run the same program (the task ids are data); the second
    # compile is served from JAX's cache.
    began = time.perf_counter()
    compiled = group.lower(device_images, rows_index).compile()
    compile_seconds = time.perf_counter() - began
    forward = bench_lib.median_seconds(lambda: group.logits(device_images, rows_index), args.runs)
    call = bench_lib.median_seconds(lambda: server.logits(images, tasks), args.runs)
    rows.append({"batch": label, "distinct tasks": len(set(tasks)),
                 "forward ms": forward * 1e3, "forward img/s": args.batch_size / forward,
                 "call ms": call * 1e3, "call img/s": args.batch_size / call,
                 "GFLOP": compiled.cost_analysis()["flops"] / 1e9,
                 "compile s": compile_seconds})
  rss_server = rss_bytes()

  # The plain single-task path last: it loads its own copy of the backbone.
  model, variables, metadata = task_export.load_task_variables(exports[names[0]], backbone)
  norm = metadata["normalization"]
  apply = jax.jit(lambda v, x: model.apply(v, normalization_lib.normalize_images(x, norm["mean"],
                                                                      norm["std"])))
  variables = jax.device_put(variables)
  began = time.perf_counter()
  compiled = apply.lower(variables, device_images).compile()
  compile_seconds = time.perf_counter() - began
  forward = bench_lib.median_seconds(lambda: apply(variables, device_images), args.runs)
  call = bench_lib.median_seconds(lambda: np.asarray(apply(variables, images)), args.runs)
  rows.insert(0, {"batch": "plain model, 1 task", "distinct tasks": 1,
                  "forward ms": forward * 1e3, "forward img/s": args.batch_size / forward,
                  "call ms": call * 1e3, "call img/s": args.batch_size / call,
                  "GFLOP": compiled.cost_analysis()["flops"] / 1e9,
                  "compile s": compile_seconds})

  print(f"{args.variant} at {size} px, {args.dtype}, {args.attention} attention, {args.method}"
        f"{f' ({args.num_prompts} prompts)' if 'vpt' in args.method else ''}, batch "
        f"{args.batch_size}, {len(names)} tasks, median of {args.runs} runs, "
        f"{jax.device_count()} {jax.default_backend()} device(s); server loaded in "
        f"{load_seconds:.1f} s")
  columns = ["batch", "distinct tasks", "forward ms", "forward img/s", "call ms",
             "call img/s", "GFLOP", "compile s"]
  bench_lib.print_table_header(columns)
  for row in rows:
    print(bench_lib.table_row((row[c] for c in columns), ".4g"))
  single = rows[1]["forward img/s"]
  print(f"mixed / single-task batch throughput (forward): "
        f"{rows[2]['forward img/s'] / single:.3f}; mixed server / plain model: "
        f"{rows[2]['forward img/s'] / rows[0]['forward img/s']:.3f}")

  memory = server.memory()
  mb = lambda b: f"{b / 2**20:.1f} MB" if b >= 2**20 else f"{b / 2**10:.1f} KB"
  print()
  print("| memory | bytes |")
  print("|---|---|")
  print(f"| backbone (held once) | {mb(memory['backbone_bytes'])} |")
  print(f"| {len(names)} exports as written | {mb(memory['export_bytes'])} |")
  print(f"| stacked task variables (heads padded to {server.max_classes} classes) | "
        f"{mb(memory['task_bytes'])} |")
  print(f"| one backbone + {len(names)} exports | "
        f"{mb(memory['backbone_bytes'] + memory['export_bytes'])} |")
  print(f"| {len(names)} separate single-task models | "
        f"{mb(len(names) * memory['backbone_bytes'] + memory['export_bytes'])} |")
  print(f"| RSS growth: loading the server and compiling | {mb(rss_server - rss_before)} |")
  print(f"| RSS after the server (peak of the process) | {mb(rss_server)} "
        f"({mb(bench_lib.peak_rss_bytes())}) |")


if __name__ == "__main__":
  main()
