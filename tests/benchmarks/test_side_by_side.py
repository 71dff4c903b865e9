"""benchmarks/side_by_side.py on fake child results (no torch, no timed step): the order
of its children, the commands they get, its table and its skip message; and its
per-child peak-memory reading on a real, tiny child."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from tests import benchmark_scripts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 2**30


side = benchmark_scripts.load("side_by_side")


def _child(row, rss_gib, returncode=0, stderr=""):
  return {"returncode": returncode, "stdout": "a log line\n" + json.dumps(row) + "\n",
          "stderr": stderr, "peak_rss_bytes": int(rss_gib * GIB), "seconds": 1.0}


class FakeChildren:
  """Answers each command as its script would; official runs take 10 s then 12 s."""

  def __init__(self):
    self.commands = []
    self.official_seconds = iter([10.0, 12.0, 30.0, 33.0])
    self.ceilings = {"side_by_side.py": iter([180.0, 170.0]),
                     "official_vpt_step.py": iter([210.0, 205.0])}

  def __call__(self, command):
    self.commands.append(command)
    script = os.path.basename(command[1])
    if "--matmul_ceiling" in command:
      return _child({"GFLOP/s": next(self.ceilings[script])}, 0.5)
    if script == "official_vpt_step.py":
      return _child({"s/step": next(self.official_seconds)}, 4.0)
    if "full" in command:  # ours, full fine-tuning: fails
      return _child({}, 0.1, returncode=1, stderr="Traceback\nMemoryError: no room")
    return _child({"s/step": 8.0, "compiled GiB": 1.5}, 5.0)


def _args(*options):
  return side.parse_args(["--official_checkout", "/ckpt", "--torch_python", "/py",
                          "--batch_sizes", "16", "--cpu_devices", "2", *options])


def test_children_run_official_ours_official_between_two_ceilings_with_parsable_commands():
  fake = FakeChildren()
  side.report(_args("--methods", "vpt_deep"), "", fake)
  scripts = [os.path.basename(c[1]) + (" ceiling" if "--matmul_ceiling" in c else "")
             for c in fake.commands]
  assert scripts == ["side_by_side.py ceiling", "official_vpt_step.py ceiling",
                     "official_vpt_step.py", "train_step.py", "official_vpt_step.py",
                     "side_by_side.py ceiling", "official_vpt_step.py ceiling"]
  torch_ceiling = benchmark_scripts.load("official_vpt_step").parse_args(fake.commands[1][2:])
  assert fake.commands[1][0] == "/py" and torch_ceiling.matmul_ceiling
  assert (torch_ceiling.checkout, torch_ceiling.threads) == ("/ckpt", 2)
  official, ours = fake.commands[2], fake.commands[3]
  assert official[0] == "/py" and ours[0] == sys.executable
  parsed = benchmark_scripts.load("official_vpt_step").parse_args(official[2:])
  assert (parsed.checkout, parsed.method, parsed.batch_size, parsed.steps, parsed.threads,
          parsed.num_prompts, parsed.variant, parsed.image_size) == (
              "/ckpt", "vpt_deep", 16, 3, 2, 50, "B/16", 224)
  assert not parsed.count_flops  # the timed runs pay for no extra counted step
  parsed = benchmark_scripts.load("train_step").parse_args(ours[2:])
  assert (parsed.json, parsed.methods, parsed.batch_size, parsed.steps, parsed.cpu_devices,
          parsed.num_prompts, parsed.variant, parsed.image_size) == (
              True, "vpt_deep", 16, 3, 2, 50, "B/16", 224)
  assert parsed.attention == "einsum" and not parsed.shard_state
  fake = FakeChildren()
  side.report(_args("--methods", "vpt_deep", "--attention", "recompute", "--shard_state"), "",
              fake)
  parsed = benchmark_scripts.load("train_step").parse_args(fake.commands[3][2:])
  assert parsed.attention == "recompute" and parsed.shard_state


def test_table_has_both_official_runs_the_ratios_and_a_failed_child(monkeypatch):
  for name in side.ALLOCATOR_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  text = side.report(_args("--methods", "vpt_deep,full"), "", FakeChildren())
  lines = text.splitlines()
  assert lines[0].endswith("dense float32 matmul 2048^3: JAX 180.0 GFLOP/s at the start, "
                           "170.0 at the end; torch (2 threads) 210.0 at the start, 205.0 at "
                           "the end; allocator: the C library's malloc")
  assert lines[1] == "| " + " | ".join(side.COLUMNS) + " |"
  assert len(lines) == 3 + 2
  # Official 10 s and 12 s against our 8 s: 1.25x and 1.5x; memory 5 GiB against 4: 1.25x.
  assert lines[3] == "| vpt_deep | 16 | 8 | 10, 12 | 1.25x, 1.50x | 5 | 4, 4 | 1.25x, 1.25x | 1.5 |"
  cells = [c.strip() for c in lines[4].strip("|").split("|")]
  assert cells[:2] == ["full", "16"] and cells[3] == "30, 33"
  assert cells[2] == "exit 1: MemoryError: no room"
  assert cells[4] == "-, -" and cells[7] == "-, -" and cells[8] == "-"


def test_the_report_names_a_preloaded_allocator_and_its_settings():
  environ = {"LD_PRELOAD": "/lib/libjemalloc.so.2", "MALLOC_CONF": "retain:true", "HOME": "/"}
  assert side.allocator_text(environ) == ("allocator: LD_PRELOAD=/lib/libjemalloc.so.2 "
                                          "MALLOC_CONF=retain:true")
  assert side.allocator_text({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}) == (
      "allocator: GLIBC_TUNABLES=glibc.malloc.arena_max=1")


def test_without_a_checkout_the_official_side_is_skipped_and_ours_still_runs(monkeypatch,
                                                                            capsys):
  fake = FakeChildren()
  monkeypatch.setattr(side, "run_child", fake)
  side.main(["--methods", "vpt_deep", "--batch_sizes", "16"])
  out = capsys.readouterr().out.splitlines()
  assert out[0] == ("official PyTorch VPT skipped: no --official_checkout and --torch_python "
                    "given")
  assert [os.path.basename(c[1]) for c in fake.commands].count("official_vpt_step.py") == 0
  assert "JAX 180.0 GFLOP/s at the start, 170.0 at the end; allocator" in out[1]  # no torch
  assert "train_step.py" in [os.path.basename(c[1]) for c in fake.commands]
  assert out[-1] == "| vpt_deep | 16 | 8 | skipped | skipped | 5 | skipped | skipped | 1.5 |"


def test_official_problem_names_what_is_missing(tmp_path):
  ok = lambda command: argparse.Namespace(returncode=0, stderr="")
  no_torch = lambda command: argparse.Namespace(
      returncode=1, stderr="official_vpt_step.py: error: torch is not importable by /py\n")
  assert "not a KMnP/vpt checkout" in side.official_problem(_args(), ok)
  marker = tmp_path / side.OFFICIAL_MARKER
  marker.parent.mkdir(parents=True)
  marker.write_text("")
  args = _args("--official_checkout", str(tmp_path), "--torch_python", str(tmp_path / "py"))
  assert "is not an executable" in side.official_problem(args, ok)
  args.torch_python = sys.executable
  assert side.official_problem(args, no_torch) == (
      "official_vpt_step.py: error: torch is not importable by /py")
  probes = []
  assert side.official_problem(args, lambda c: probes.append(c) or ok(c)) == ""
  assert probes == [[sys.executable, side.OFFICIAL_SCRIPT, "--checkout", str(tmp_path),
                     "--check_only"]]


def test_unknown_method_is_refused():
  with pytest.raises(SystemExit):
    side.parse_args(["--methods", "vpt_deep,lora"])


def test_run_child_reads_the_childs_own_peak_memory():
  # The child touches 300 MiB; its parent never does. The parent is a fresh,
  # small interpreter: a forked child's peak also counts the pages of its
  # parent before exec, and this test process holds JAX and the suite's arrays.
  code = "b = bytearray(300 * 2**20); print('{\"done\": 1}')"
  probe = ("import json, sys; sys.path.insert(0, %r); import side_by_side as side; "
           "print(json.dumps(side.run_child([sys.executable, '-c', %r])))"
           % (os.path.dirname(side.__file__), code))
  child = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                    text=True, check=True).stdout)
  assert child["returncode"] == 0 and side.json_rows(child["stdout"]) == [{"done": 1}]
  assert 300 * 2**20 <= child["peak_rss_bytes"] < 600 * 2**20, child["peak_rss_bytes"]
  failed = side.outcome(side.run_child([sys.executable, "-c", "raise SystemExit('bad input')"]))
  assert failed == {"error": "exit 1: bad input"}
  piped = side.outcome(side.run_child([sys.executable, "-c", "raise SystemExit('a | b')"]))
  assert piped == {"error": "exit 1: a \\| b"}  # escaped for the markdown table
