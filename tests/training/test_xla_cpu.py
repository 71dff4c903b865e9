"""training/xla_cpu: the scheduler flag joins XLA_FLAGS unless they already choose one."""

import pytest

from vpt_jax.training import xla_cpu


def test_memory_scheduler_is_added_to_empty_and_other_flags():
  environ = {}
  xla_cpu.use_scheduler("memory", environ)
  assert environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  environ = {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"}
  xla_cpu.use_scheduler("memory", environ)
  assert environ["XLA_FLAGS"] == ("--xla_cpu_max_isa=SSE4_2 "
                                  "--xla_cpu_enable_concurrency_optimized_scheduler=false")


def test_concurrency_scheduler_is_xla_default_made_explicit():
  environ = {}
  xla_cpu.use_scheduler("concurrency", environ)
  assert environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"


def test_flags_that_already_choose_win():
  chosen = "--xla_cpu_enable_concurrency_optimized_scheduler=true --xla_dump_to=/tmp/x"
  environ = {"XLA_FLAGS": chosen}
  xla_cpu.use_scheduler("memory", environ)
  assert environ["XLA_FLAGS"] == chosen


def test_unknown_scheduler_is_refused():
  with pytest.raises(ValueError, match="choose one of"):
    xla_cpu.use_scheduler("fastest", {})
