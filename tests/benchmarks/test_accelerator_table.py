"""benchmarks/accelerator_table.py (the table accelerator.sh prints, on hand-written logs) and
benchmarks/accelerator.sh itself (its commands, without running them)."""

import os
import shlex
import subprocess

from tests import benchmark_scripts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "accelerator.sh")


def _dry_run(*options):
  result = subprocess.run(["bash", SCRIPT, "--dry_run", "--python", "PY", *options],
                          capture_output=True, text=True, check=True)
  return [shlex.split(line) for line in result.stdout.splitlines()]


def test_dry_run_lists_every_run_and_each_parses_with_its_benchmark():
  commands = _dry_run("--variants", "B/16 L/16", "--batches", "64 256")
  scripts = [os.path.basename(command[1]) for command in commands]
  # Per variant x batch x attention: 2 dtypes x (step + serving) + 2 memory (vpt_deep, full).
  assert len(commands) == 2 * 2 * 2 * (2 * 2 + 2)
  assert scripts.count("memory.py") == 2 * 2 * 2 * 2
  parsed = {name: benchmark_scripts.load(name) for name in ("train_step", "memory", "serving")}
  seen = set()
  for command in commands:
    assert command[0] == "PY"
    args = parsed[os.path.basename(command[1])[:-3]].parse_args(command[2:])
    seen.add((getattr(args, "variant", getattr(args, "variants", None)), args.batch_size,
              getattr(args, "dtype", None), args.attention))
  assert {a for _, _, _, a in seen} == {"einsum", "dot_product"}
  assert {d for _, _, d, _ in seen} == {"float32", "bfloat16", None}  # memory sweeps dtypes
  assert {(v, b) for v, b, _, _ in seen} == {(v, b) for v in ("B/16", "L/16") for b in (64, 256)}


def test_help_and_unknown_option():
  help_text = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True,
                             check=True).stdout
  assert "--dry_run" in help_text
  bad = subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True, text=True)
  assert bad.returncode == 2 and "--bogus" in bad.stderr


TRAIN_LOG = """## train_step variant=B/16 batch=64 dtype=bfloat16 attention=dot_product
train step; dense float32 matmul 2048^3: 100.0 GFLOP/s; ...
| method | prompts | s/step | img/s | GFLOP | GFLOP/s |
|---|---|---|---|---|---|
| vpt_deep | 50 | 0.5 | 128 | 3200 | 6400 |
## status ok
"""
MEMORY_LOG = """## memory variant=L/16 batch=64 method=full attention=einsum
| variant | dtype | remat | accum | temp GiB | peak GiB | GFLOP |
|---|---|---|---|---|---|---|
| L/16 | bfloat16 | block | 1 | 3.5 | 9.25 | nan |
## status ok
"""
FAILED_LOG = """## serving variant=L/16 batch=256 dtype=float32 attention=einsum
Traceback ...: RESOURCE_EXHAUSTED
## status failed (1)
"""


def test_table_merges_rows_and_reports_failures():
  table = benchmark_scripts.load("accelerator_table").merged_table([TRAIN_LOG, MEMORY_LOG, FAILED_LOG])
  lines = table.splitlines()
  assert lines[0].startswith("| benchmark | variant | batch | dtype | attention | what |")
  assert len(lines) == 2 + 3
  # 3200 GFLOP over a batch of 64 = 50 GFLOP per image.
  assert lines[2] == ("| train_step | B/16 | 64 | bfloat16 | dot_product | vpt_deep | 128 | 50 "
                      "|  |  | 0.5 | ok |")
  assert lines[3] == ("| memory | L/16 | 64 | bfloat16 | einsum | full remat=block |  |  "
                      "| 9.25 | 3.5 |  | ok |")
  assert "(no table: see the log)" in lines[4] and lines[4].endswith("| failed (1) |")
