r"""Our training step beside the official PyTorch VPT's, each in its own process.

For each method and batch size three child processes run one after another:
the official step (``benchmarks/official_vpt_step.py`` in the torch
interpreter), ours (``benchmarks/train_step.py --json``), then the official
step again, so that drift of the machine's speed shows in the two official
figures. Each child's peak resident memory is read from the kernel when it
ends (``os.wait4``), so every figure is one process's own peak. A dense
float32 2048^3 matmul is timed at the start and at the end, in a short child of
its own, for each side's library: JAX (one device on every core) and, when the
official side runs, torch with its threads. They are the ceilings of the run;
their ratio is the head start the official side's matmul library has on this
machine.

  python benchmarks/side_by_side.py --official_checkout /tmp/kmnp-vpt \
      --torch_python /tmp/torch-venv/bin/python --cpu_devices 2
  python benchmarks/side_by_side.py --official_checkout /tmp/kmnp-vpt \
      --torch_python /tmp/torch-venv/bin/python --batch_sizes 2 --steps 1 \
      --image_size 32 --num_prompts 5                      # smoke run
  python benchmarks/side_by_side.py                         # ours only (official skipped)

Without a working checkout and torch interpreter the official side is
skipped, with one line saying why, and ours still runs. Setup of the official
side: "Side by side with the official PyTorch VPT" in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OFFICIAL_SCRIPT = os.path.join(HERE, "official_vpt_step.py")
OURS_SCRIPT = os.path.join(HERE, "train_step.py")
# The file whose presence marks a KMnP/vpt checkout (as official_vpt_step.py checks).
OFFICIAL_MARKER = os.path.join("src", "models", "vit_prompt", "vit.py")
GIB = 2**30
# Environment variables that swap or tune the allocator of every child process.
ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")
COLUMNS = ["method", "batch", "ours s/step", "official s/step (before, after)",
           "speed ratio official/ours", "ours peak RSS GiB",
           "official peak RSS GiB (before, after)", "memory ratio ours/official",
           "ours compiled GiB"]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--official_checkout", default="",
                      help="a KMnP/vpt checkout (the folder holding src/ and configs/)")
  parser.add_argument("--torch_python", default="",
                      help="a Python interpreter with torch (and the official code's imports)")
  parser.add_argument("--methods", default="vpt_deep,full", help="vpt_deep and/or full")
  parser.add_argument("--batch_sizes", default="16,64")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per child (median)")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="ours: train_step.py --cpu_devices (0 = JAX's default, one device)")
  parser.add_argument("--shard_state", action="store_true",
                      help="ours: train_step.py --shard_state (optimizer state split over "
                           "the devices)")
  parser.add_argument("--attention", default="einsum",
                      help="ours: train_step.py --attention (model.attention; recompute keeps "
                           "no attention weights for the backward pass)")
  parser.add_argument("--threads", type=int, default=2, help="official: torch threads")
  parser.add_argument("--variant", default="B/16", help="B/16 or L/16 (both sides)")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_prompts", type=int, default=50)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--matmul_ceiling", action="store_true",
                      help="only time the dense float32 matmul and print its GFLOP/s "
                           "(what this script runs in a child at the start and the end)")
  args = parser.parse_args(argv)
  unknown = set(args.methods.split(",")) - {"vpt_deep", "full"}
  if unknown:
    parser.error(f"--methods {sorted(unknown)}: the official side has vpt_deep and full only")
  return args


def official_problem(args, probe=None) -> str:
  """Why the official side cannot run ("" when it can); ``probe`` runs a command."""
  if not args.official_checkout or not args.torch_python:
    return "no --official_checkout and --torch_python given"
  if not os.path.isfile(os.path.join(args.official_checkout, OFFICIAL_MARKER)):
    return f"{args.official_checkout} is not a KMnP/vpt checkout (no {OFFICIAL_MARKER})"
  if not os.access(args.torch_python, os.X_OK):
    return f"--torch_python {args.torch_python} is not an executable"
  probe = probe or (lambda command: subprocess.run(command, capture_output=True, text=True))
  # The official script imports torch and the official modules, then stops.
  result = probe([args.torch_python, OFFICIAL_SCRIPT, "--checkout", args.official_checkout,
                  "--check_only"])
  if result.returncode:
    return (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
  return ""


def run_child(command) -> dict:
  """Runs ``command`` to its end; returns its exit code, output and own peak RSS.

  Returns {"returncode", "stdout", "stderr", "peak_rss_bytes", "seconds"}; the
  peak is the child's ``ru_maxrss`` from ``os.wait4`` (kB on Linux).
  """
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    began = time.perf_counter()
    child = subprocess.Popen(command, stdout=out, stderr=err, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    seconds = time.perf_counter() - began
    out.seek(0)
    err.seek(0)
    return {"returncode": child.returncode, "stdout": out.read(), "stderr": err.read(),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "seconds": seconds}


def json_rows(stdout: str) -> list:
  """The JSON objects of a child's output, one per line starting with "{"."""
  return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _official_script(args) -> list:
  """The official script in the torch interpreter, on the checkout, with its threads."""
  return [args.torch_python, OFFICIAL_SCRIPT, "--checkout", args.official_checkout,
          "--threads", str(args.threads)]


def official_command(args, method: str, batch: int) -> list:
  return [*_official_script(args),
          "--method", method, "--batch_size", str(batch), "--steps", str(args.steps),
          "--num_prompts", str(args.num_prompts),
          "--variant", args.variant, "--image_size", str(args.image_size),
          "--num_classes", str(args.num_classes)]


def ours_command(args, method: str, batch: int) -> list:
  return [sys.executable, OURS_SCRIPT, "--json", "--methods", method,
          "--batch_size", str(batch), "--steps", str(args.steps),
          "--cpu_devices", str(args.cpu_devices), "--num_prompts", str(args.num_prompts),
          "--variant", args.variant, "--image_size", str(args.image_size),
          "--num_classes", str(args.num_classes), "--attention", args.attention,
          *(["--shard_state"] if args.shard_state else [])]


def ceiling_command() -> list:
  return [sys.executable, os.path.abspath(__file__), "--matmul_ceiling"]


def official_ceiling_command(args) -> list:
  return [*_official_script(args), "--matmul_ceiling"]


def outcome(child: dict) -> dict:
  """One child's figures: {"s/step", "peak_rss_bytes", "compiled GiB"?} or {"error"}."""
  rows = json_rows(child["stdout"]) if child["returncode"] == 0 else []
  if not rows:
    last = (child["stderr"].strip().splitlines() or ["(no output)"])[-1]
    return {"error": f"exit {child['returncode']}: " + last.replace("|", "\\|")}  # a table cell
  return {**rows[-1], "peak_rss_bytes": child["peak_rss_bytes"]}


def measure(args, method: str, batch: int, run, with_official: bool) -> dict:
  """Official, ours, official again for one method and batch; ``run`` runs a command.

  Returns {"method", "batch", "ours": outcome, "official": [outcome, ...]}.
  """
  def official():
    print(f"running the official {method} step, batch {batch}", file=sys.stderr, flush=True)
    return outcome(run(official_command(args, method, batch)))
  before = [official()] if with_official else []
  print(f"running our {method} step, batch {batch}", file=sys.stderr, flush=True)
  ours = outcome(run(ours_command(args, method, batch)))
  after = [official()] if with_official else []
  return {"method": method, "batch": batch, "ours": ours, "official": before + after}


def matmul_ceiling(run, command) -> str:
  """A ceiling child's GFLOP/s as text, or why it failed."""
  result = outcome(run(command))
  return result["error"] if "error" in result else f"{result['GFLOP/s']:.1f}"


def ceilings(args, run, with_official: bool) -> list:
  """[JAX's ceiling, torch's ceiling or None] as text, each child run now."""
  return [matmul_ceiling(run, ceiling_command()),
          matmul_ceiling(run, official_ceiling_command(args)) if with_official else None]


def ceilings_text(args, start: list, end: list) -> str:
  text = (f"dense float32 matmul 2048^3: JAX {start[0]} GFLOP/s at the start, {end[0]} at "
          f"the end")
  if start[1] is not None:
    text += f"; torch ({args.threads} threads) {start[1]} at the start, {end[1]} at the end"
  return text


def _figures(results: list, key: str, scale: float = 1.0) -> str:
  return ", ".join(r["error"] if "error" in r else f"{r[key] / scale:.3g}" for r in results)


def _ratios(numerators: list, denominators: list, key: str) -> str:
  """numerator / denominator per pair, "-" where either failed or is missing."""
  pairs = [(n, d) for n in numerators for d in denominators]
  return ", ".join("-" if "error" in n or "error" in d else f"{n[key] / d[key]:.2f}x"
                   for n, d in pairs) or "-"


def table_row(measured: dict) -> str:
  """The markdown row of one ``measure`` result (official columns "skipped" if empty)."""
  ours, official = measured["ours"], measured["official"]
  skipped = "skipped"
  cells = [measured["method"], str(measured["batch"]), _figures([ours], "s/step"),
           _figures(official, "s/step") or skipped,
           _ratios(official, [ours], "s/step") if official else skipped,
           _figures([ours], "peak_rss_bytes", GIB),
           _figures(official, "peak_rss_bytes", GIB) or skipped,
           _ratios([ours], official, "peak_rss_bytes") if official else skipped,
           "-" if "error" in ours or "compiled GiB" not in ours else
           f"{ours['compiled GiB']:.3g}"]
  return "| " + " | ".join(cells) + " |"


def table(measurements: list) -> str:
  """The markdown table of every ``measure`` result."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  return "\n".join(lines + [table_row(m) for m in measurements])


def time_matmul() -> float:
  """Dense float32 2048^3 matmul GFLOP/s in this process (JAX), median of 5."""
  sys.path.insert(0, HERE)
  import train_step  # pylint: disable=g-import-not-at-top
  return train_step.matmul_gflops()


def official_line(args, problem: str) -> str:
  """The first line of the report: the official side's setup, or why it is skipped."""
  if problem:
    return f"official PyTorch VPT skipped: {problem}"
  return (f"official PyTorch VPT: {args.official_checkout} run by {args.torch_python}, "
          f"{args.threads} threads")


def allocator_text(environ=os.environ) -> str:
  """The memory allocator every child inherits: glibc's, or what the environment preloads.

  It moves both sides' step times (a caching allocator spares each step its
  page faults), so the report names it.
  """
  settings = [f"{name}={environ[name]}" for name in ALLOCATOR_VARIABLES if environ.get(name)]
  return "allocator: " + (" ".join(settings) if settings else "the C library's malloc")


def report(args, problem: str, run=run_child) -> str:
  """Runs every measurement (``run`` runs one command); the ceilings line and the table."""
  start = ceilings(args, run, not problem)
  measurements = [measure(args, method, int(batch), run, not problem)
                  for method in args.methods.split(",")
                  for batch in args.batch_sizes.split(",")]
  end = ceilings(args, run, not problem)
  devices = args.cpu_devices or "JAX's default (1)"
  return (f"{args.variant} at {args.image_size} px, {args.num_prompts} prompts, float32, "
          f"{args.attention} attention, "
          f"median of {args.steps} steps after one warm-up; ours on {devices} CPU device(s); "
          f"{ceilings_text(args, start, end)}; {allocator_text()}\n" + table(measurements))


def main(argv=None):
  args = parse_args(argv)
  if args.matmul_ceiling:
    print(json.dumps({"GFLOP/s": time_matmul()}), flush=True)
    return
  problem = official_problem(args)
  print(official_line(args, problem), flush=True)
  print(report(args, problem, run_child), flush=True)


if __name__ == "__main__":
  main()
