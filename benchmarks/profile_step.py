r"""Where a training step's time goes: a profile of the compiled step by kind of op.

Runs the step of ``benchmarks/train_step.py`` (same flags) under
``jax.profiler`` with XLA's per-op trace events on, then joins every executed
op with the optimized HLO to sort it into dense matmuls, batched (attention)
matmuls, convolutions and the rest, with the FLOPs of the matmuls read from
their shapes. Prints time, share and achieved GFLOP/s per kind.

XLA:CPU's Eigen matmul thunks (a bare ``dot`` in the optimized HLO, e.g. full
fine-tuning's weight gradients) return once the product is handed to the
thread pool: their trace events last about 0.1 ms, and their thread waits for
the product before its next op. So a bare dot's time runs to the next op's
start on its thread (``thread_op_seconds``); every other op's is its event's
length (a collective's includes its wait for the other devices). What is left
of each thread's span from its first op to its last is printed as idle: on one
device, the second thread's waits while the first runs an op on both cores.

  XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true \
    python benchmarks/profile_step.py --methods vpt_deep [--cpu_devices 2] [--top 15]

``--top N`` also lists the N costliest sources (HLO op names, summed over the
blocks) of the non-matmul fusions.

(XLA_FLAGS must be set before Python starts; the script refuses to run
without it, since the trace would hold no per-op events.)
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top

import train_step  # pylint: disable=g-import-not-at-top

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# name = shape opcode(operands...; a tuple shape "(f32[768]{0}, ...)" holds spaces.
INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+?)(?:\{[^}]*\})? ([\w\-]+)\((.*)$")
SHAPE = re.compile(r"\w+\[([\d,]*)\]")
IDLE = "idle (the thread ran no op)"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def parse_hlo(text: str) -> dict:
  """Optimized HLO text -> {instruction: (dims, opcode, rest of line, computation)}."""
  instructions, computation = {}, None
  for line in text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    match = INSTRUCTION.match(line)
    if match:
      name, shape, opcode, rest = match.groups()
      dims = SHAPE.match(shape)
      instructions[name] = ([int(d) for d in dims.group(1).split(",") if d] if dims else None,
                            opcode, rest, computation)
  return instructions


def dot_flops(name: str, instructions: dict) -> tuple[str, float]:
  """("dense"|"batched", FLOPs) of a dot instruction, from its operand shapes."""
  out_dims, _, rest, _ = instructions[name]
  lhs = re.match(r"%?([\w.\-]+)", rest).group(1)
  lhs_dims = instructions[lhs][0]
  contracting = [int(i) for i in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                 .group(1).split(",") if i]
  flops = 2 * math.prod(out_dims) * math.prod(lhs_dims[i] for i in contracting)
  return ("batched" if "lhs_batch_dims" in rest else "dense"), flops


def classify(name: str, instructions: dict) -> tuple[str, float]:
  """The kind of an executed op and its matmul FLOPs (kind None: not an HLO op)."""
  if name not in instructions:
    return None, 0.0
  _, opcode, rest, _ = instructions[name]
  if opcode == "dot":
    kind, flops = dot_flops(name, instructions)
    return f"matmul, {kind}", flops
  called = re.search(r"calls=%?([\w.\-]+)", rest)
  if opcode in ("fusion", "custom-call") and called:
    body = [n for n, v in instructions.items() if v[3] == called.group(1)]
    dots = [dot_flops(n, instructions) for n in body if instructions[n][1] == "dot"]
    if dots:
      return f"matmul, {dots[0][0]}", sum(f for _, f in dots)
    if any(instructions[n][1] == "convolution" for n in body):
      return "convolution", 0.0
    return "elementwise / reduce / copy fusions", 0.0
  if opcode == "convolution":
    return "convolution", 0.0
  if opcode in COLLECTIVES:
    return "collectives (gradient all-reduce, waits included)", 0.0
  return f"other ({opcode})", 0.0


def thread_op_seconds(events, instructions: dict):
  """([(event, kind, matmul FLOPs, seconds)] of the HLO ops in trace ``events``,
  thread-seconds with no op running).

  A bare ``dot``'s seconds run to the next op's start on its thread (the last
  op keeps its own length); any other op's are its event's length.
  """
  by_thread = collections.defaultdict(list)
  for event in events:
    if event.get("ph") != "X":
      continue
    # Host-side runtime events (waits, thread-pool regions) are not ops.
    kind, flops = classify(event["name"], instructions)
    if kind is not None:
      by_thread[(event.get("pid"), event.get("tid"))].append((event, kind, flops))
  end = lambda event: event["ts"] + event.get("dur", 0)
  attributed, idle = [], 0.0
  for ops in by_thread.values():
    ops.sort(key=lambda op: op[0]["ts"])
    busy = 0.0
    for index, (event, kind, flops) in enumerate(ops):
      last = index == len(ops) - 1
      asynchronous = instructions[event["name"]][1] == "dot" and not last
      seconds = ((ops[index + 1][0]["ts"] if asynchronous else end(event)) - event["ts"]) / 1e6
      attributed.append((event, kind, flops, seconds))
      busy += seconds
    idle += (end(ops[-1][0]) - ops[0][0]["ts"]) / 1e6 - busy
  return attributed, idle


def source(name: str, instructions: dict) -> str:
  """A fusion's op_name from the HLO metadata, with block numbers dropped: what it computes."""
  found = re.search(r'op_name="([^"]+)"', instructions[name][2])
  if not found:
    return name
  return re.sub(r"(encoderblock|layer)_\d+", r"\1_*", found.group(1).replace("jit(train_step)/", ""))


def main(argv=None):
  if TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit(f"Set XLA_FLAGS={TRACE_FLAG} before starting Python: without it the "
                     "trace has no per-op events")
  top = 0
  if argv is None:
    argv = sys.argv[1:]
  if "--top" in argv:  # this script's own flag; the rest are train_step.py's
    at = argv.index("--top")
    top, argv = int(argv[at + 1]), argv[:at] + argv[at + 2:]
  args = train_step.parse_args(argv)
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  for method in args.methods.split(","):
    step = train_step.build_step(method, args, True, args.num_prompts)
    instructions = parse_hlo(step["compiled"].as_text())
    arguments = train_step.run_steps(step, 1)  # warm-up
    with tempfile.TemporaryDirectory() as directory:
      jax.profiler.start_trace(directory, create_perfetto_trace=True)
      began = time.perf_counter()
      train_step.run_steps(step, args.steps, arguments)
      wall = (time.perf_counter() - began) / args.steps
      jax.profiler.stop_trace()
      trace_file, = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
      with gzip.open(trace_file) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    seconds, flops = collections.Counter(), collections.Counter()
    by_source = collections.Counter()
    attributed, idle = thread_op_seconds(events, instructions)
    seconds[IDLE] = idle / args.steps
    for event, kind, op_flops, op_seconds in attributed:
      seconds[kind] += op_seconds / args.steps
      flops[kind] += op_flops / args.steps
      if kind.startswith("elementwise"):
        by_source[source(event["name"], instructions)] += op_seconds / args.steps
    total = sum(seconds.values())
    print(f"\n{method}, {args.variant} at {args.image_size} px, batch {args.batch_size}, "
          f"{args.num_prompts} prompts, {jax.device_count()} device(s): {wall:.2f} s per "
          f"traced step (wall), {total:.2f} s summed over the threads that ran ops")
    print("| kind | s | share | GFLOP | GFLOP/s |\n|---|---|---|---|---|")
    for kind, value in seconds.most_common():
      rate = f"{flops[kind] / 1e9 / value:.1f}" if flops[kind] else ""
      print(f"| {kind} | {value:.2f} | {100 * value / total:.1f}% | "
            f"{flops[kind] / 1e9:.0f} | {rate} |")
    if top:
      print(f"\nThe {top} costliest sources of non-matmul fusions (s per step, all blocks):")
      print("| source (forward: jvp, backward: transpose) | s |\n|---|---|")
      for name, value in by_source.most_common(top):
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
  main()
