r"""The fixed costs of one run that are the library's own, not the model's FLOPs.

Three measurements:

1. A whole run, profiled: the quickstart's ``:ci`` variant cut to one run
   (VPT-deep on ``count``, one epoch, one process), through run.py's entry point
   under cProfile, twice in fresh processes sharing one compilation cache (the
   first writes it, the second reads it). The table splits the run's wall time
   into: dataset build (the quickstart's local TFDS builders), TFDS metadata +
   training cache (``inputs.load_train_data``), backbone read and fingerprint,
   eval pipeline build + streaming, XLA compiles (persistent cache included).
   Imports are timed apart: a fresh interpreter importing what run.py imports.
2. A ViT-B/16-sized backbone (``--backbone_mb``, random float32 in the official
   .npz layout's size, 330 MB as ViT-B_16.npz): read time and the sha256
   fingerprint, the first and the repeated call in one process.
3. A run's parameter setup for ViT-B/16 VPT-deep from a (random) backbone
   file: read, strict merge and the init of the fresh leaves (prompts, head).

  python benchmarks/run_overheads.py                  # all three
  python benchmarks/run_overheads.py --skip_run       # 2 and 3 only
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (row, file suffix, function) whose cumulative times the profile reports.
PHASES = (
    ("dataset build (quickstart's local builders)", "suites/quickstart.py", "prepare_data"),
    ("TFDS metadata + training cache", "training/inputs.py", "load_train_data"),
    ("backbone read (.npz)", "checkpoints/npz.py", "read_npz"),
    ("backbone fingerprint (sha256)", "checkpoints/npz.py", "fingerprint"),
    ("run setup (all of the above but the dataset build)", "training/setup.py", "build_runs"),
    ("evaluation (pipeline build + stream + eval steps)", "training/evaluation.py",
     "eval_totals"),
    ("XLA compiles (incl. persistent-cache reads)", "jax/_src/compiler.py",
     "compile_or_get_cached"),
)
# What run.py imports before it computes anything (the quickstart path).
IMPORTS = ("import vpt_jax.main, vpt_jax.suites.quickstart, vpt_jax.training.trainer; "
           "from configs import quickstart")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--backbone_mb", type=int, default=330)
  parser.add_argument("--skip_run", action="store_true")
  parser.add_argument("--profile_child", default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def profile_child(workdir: str, cache_dir: str) -> None:
  """Runs the cut quickstart through run.py's entry point under cProfile; prints JSON."""
  from vpt_jax import main  # pylint: disable=g-import-not-at-top
  sys.argv = ["run.py", "--config=configs/quickstart.py:ci", f"--workdir={workdir}",
              "--config.run_order=('vpt_deep',)", "--config.workers=1",
              "--config.base.optim.epochs=1", f"--compilation_cache_dir={cache_dir}"]
  profiler = cProfile.Profile()
  began = time.perf_counter()
  try:
    profiler.runcall(main.run)
  except SystemExit as e:  # absl's app.run ends with sys.exit
    if e.code:
      raise
  total = time.perf_counter() - began
  profiler.dump_stats(os.path.join(os.path.dirname(workdir), "profile.pstats"))
  stats = pstats.Stats(profiler).stats
  seconds = {"run (after imports)": total}
  for row, suffix, function in PHASES:
    seconds[row] = sum(value[3] for (path, _, name), value in stats.items()
                       if name == function and path.endswith(suffix))
  print(json.dumps(seconds))


def import_seconds() -> float:
  began = time.perf_counter()
  subprocess.run([sys.executable, "-c", IMPORTS], cwd=REPO, check=True)
  return time.perf_counter() - began


def run_table() -> None:
  rows = []
  with tempfile.TemporaryDirectory(prefix="vpt_jax_overheads_") as tmp:
    for label in ("first", "second"):
      out = subprocess.run([sys.executable, os.path.abspath(__file__),
                            f"--profile_child={os.path.join(tmp, label)}"],
                           cwd=REPO, capture_output=True, text=True, check=True)
      rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
  print(f"imports (fresh interpreter): {import_seconds():.1f} s")
  print("| phase | first run s (empty compile cache) | second run s (warm) |")
  print("|---|---|---|")
  for phase in rows[0][1]:
    print(f"| {phase} | {rows[0][1][phase]:.2f} | {rows[1][1][phase]:.2f} |")


def backbone_table(megabytes: int) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vpt_jax.checkpoints import npz  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="vpt_jax_backbone_") as tmp:
    path = os.path.join(tmp, "backbone.npz")
    rng = np.random.default_rng(0)
    # 12 "blocks" of float32 weights adding up to the requested size.
    per_block = megabytes * 2**20 // 4 // 12
    npz.save_npz({f"block_{i}/kernel": rng.standard_normal(per_block, np.float32)
                  for i in range(12)}, path)
    timings = {}
    for label, call in (("read_npz", lambda: npz.read_npz(path)),
                        ("fingerprint, first call", lambda: npz.fingerprint(path)),
                        ("fingerprint, again (same path, size, mtime)",
                         lambda: npz.fingerprint(path))):
      began = time.perf_counter()
      call()
      timings[label] = time.perf_counter() - began
    size = os.path.getsize(path) / 2**20
  print(f"\nbackbone of {size:.0f} MB:")
  for label, seconds in timings.items():
    print(f"  {label}: {seconds:.2f} s")


def init_table(megabytes_note: str = "") -> None:
  """Seconds of a run's parameter setup for ViT-B/16 VPT-deep from a backbone file."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from vpt_jax.checkpoints import npz  # pylint: disable=g-import-not-at-top
  from vpt_jax.methods import factory  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import setup  # pylint: disable=g-import-not-at-top
  config = common.base_config()
  common.apply_method(config, "vpt_deep")
  config.model.variant, config.model.image_size, config.prompt.num_prompts = "B/16", 224, 50
  spec = factory.model_spec(config)
  model = factory.build_model(spec, 10)
  shapes = factory.variable_shapes(model, 224)["params"]
  rng = np.random.default_rng(0)
  backbone = {name: jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), tree)
              for name, tree in shapes.items() if name not in ("head", "vpt")}
  with tempfile.TemporaryDirectory(prefix="vpt_jax_init_") as tmp:
    config.model.init_checkpoint = os.path.join(tmp, "ViT-B_16.npz")
    npz.save_npz(backbone, config.model.init_checkpoint)
    began = time.perf_counter()
    setup._initial_parameters(config, spec, model, mesh_lib.make_data_mesh())  # pylint: disable=protected-access
    print(f"\nparameter setup of a run, ViT-B/16 VPT-deep from a backbone file (read, strict "
          f"merge, init of the fresh leaves){megabytes_note}: {time.perf_counter() - began:.1f} s")


def main(argv=None):
  args = parse_args(argv)
  if args.profile_child:
    os.makedirs(args.profile_child)
    profile_child(os.path.join(args.profile_child, "run"),
                  os.path.join(os.path.dirname(args.profile_child), "jax_cache"))
    return
  if not args.skip_run:
    run_table()
  backbone_table(args.backbone_mb)
  init_table()


if __name__ == "__main__":
  main()
