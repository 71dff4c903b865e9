"""benchmarks/profile_step.py's reading of HLO text and trace events (no traced step):
which op is what kind, and how much of a thread's time each op gets."""

import pytest

from tests import benchmark_scripts

profile = benchmark_scripts.load("profile_step")

# Optimized HLO as XLA:CPU prints it: a dense dot, a batched one, a fusion
# and a gradient all-reduce whose tuple shape holds spaces.
HLO = """\
HloModule jit_train_step

%fused_computation.1 (param_0: f32[8,768]) -> f32[8,768] {
  %param_0 = f32[8,768]{1,0} parameter(0)
  ROOT %add.1 = f32[8,768]{1,0} add(%param_0, %param_0), metadata={op_name="jit(train_step)/jvp(VisionTransformer)/Transformer/encoderblock_3/add"}
}

ENTRY %main (p0: f32[8,768], p1: f32[768,3072], p2: f32[4,5,6], p3: f32[4,6,7]) -> f32[8,3072] {
  %p0 = f32[8,768]{1,0} parameter(0)
  %p1 = f32[768,3072]{1,0} parameter(1)
  %p2 = f32[4,5,6]{2,1,0} parameter(2)
  %p3 = f32[4,6,7]{2,1,0} parameter(3)
  %dot.1 = f32[8,3072]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %dot.2 = f32[4,5,7]{2,1,0} dot(%p2, %p3), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  %add_fusion = f32[8,768]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.1
  %all-reduce.7 = (f32[768]{0}, f32[8,768]{1,0}) all-reduce(%p0, %add_fusion), replica_groups={}, to_apply=%sum
  ROOT %copy.1 = f32[8,3072]{1,0} copy(%dot.1)
}
"""


def _event(name, start_us, length_us, thread=1):
  return {"ph": "X", "name": name, "ts": start_us, "dur": length_us, "pid": 7, "tid": thread}


def test_matmul_kinds_and_flops_come_from_the_shapes():
  instructions = profile.parse_hlo(HLO)
  # 2 x output elements x contracted size: 2 * 8 * 3072 * 768 and 2 * 4 * 5 * 7 * 6.
  assert profile.classify("dot.1", instructions) == ("matmul, dense", 2 * 8 * 3072 * 768)
  assert profile.classify("dot.2", instructions) == ("matmul, batched", 2 * 4 * 5 * 7 * 6)
  assert profile.classify("add_fusion", instructions)[0] == "elementwise / reduce / copy fusions"
  assert profile.classify("ThreadpoolListener::Record", instructions) == (None, 0.0)
  assert profile.source("add_fusion", instructions) == "add_fusion"


def test_a_tuple_shaped_all_reduce_is_a_collective():
  instructions = profile.parse_hlo(HLO)
  assert instructions["all-reduce.7"][1] == "all-reduce"
  assert profile.classify("all-reduce.7", instructions)[0].startswith("collectives")


def test_an_asynchronous_matmul_gets_the_time_until_the_next_op():
  instructions = profile.parse_hlo(HLO)
  events = [
      # Thread 1: the Eigen dot's event lasts 0.1 ms, but the next op starts
      # 50 ms later; the fusion ends the thread's ops with its own 2 ms.
      _event("dot.1", 1_000, 100), _event("ThreadpoolListener::Record", 1_200, 0),
      _event("add_fusion", 51_000, 2_000),
      # Thread 2: the all-reduce waits 30 ms for thread 1, then the batched dot.
      _event("all-reduce.7", 1_000, 30_000, thread=2), _event("dot.2", 31_000, 5_000, thread=2),
      {"ph": "M", "name": "thread_name", "pid": 7, "tid": 2, "args": {"name": "x"}},
      # Thread 3: two 1 ms fusions 10 ms apart; a fusion's time is its own.
      _event("add_fusion", 0, 1_000, thread=3), _event("add_fusion", 11_000, 1_000, thread=3),
  ]
  attributed, idle = profile.thread_op_seconds(events, instructions)
  by_thread = {(event["tid"], event["name"], event["ts"]): (kind, seconds)
               for event, kind, _, seconds in attributed}
  assert by_thread[(1, "dot.1", 1_000)][1] == pytest.approx(0.050)
  assert by_thread[(1, "add_fusion", 51_000)][1] == pytest.approx(0.002)
  assert by_thread[(2, "all-reduce.7", 1_000)][1] == pytest.approx(0.030)
  assert by_thread[(2, "dot.2", 31_000)][1] == pytest.approx(0.005)
  assert [by_thread[(3, "add_fusion", ts)][1] for ts in (0, 11_000)] == pytest.approx([0.001] * 2)
  assert len(attributed) == 6  # the runtime's own events are no ops
  # Thread 3 ran no op for 10 ms; threads 1 and 2 were never without one.
  assert idle == pytest.approx(0.010)
