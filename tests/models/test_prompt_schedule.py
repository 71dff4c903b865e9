"""prompt_schedule: what the encoder does before each block, derived by hand from
the VPT reference's forwards (vit_ablations.py: forward_deep_prompt,
forward_reverse_deep_prompt, forward_noexpand_deep_prompt)."""

from __future__ import annotations

import numpy as np
import pytest

from vpt_jax.models import hooks as hooks_lib
from vpt_jax.models import prompt_schedule as ps

B = ps.BlockPrompts
PLAN = hooks_lib.PromptPlan


def test_default_deep_with_and_without_dead_work_skipping():
  # Every set's outputs are replaced by the next block's set: keys/values only,
  # except the last block's when the pool reads them.
  steps = ps.schedule(PLAN(), 3, 3, outputs_read=False, skip_dead_work=True)
  assert steps == (B(False, 0, "kv"), B(False, 1, "kv"), B(False, 2, "kv"))
  steps = ps.schedule(PLAN(), 3, 3, outputs_read=True, skip_dead_work=True)
  assert steps[-1] == B(False, 2, "insert")
  steps = ps.schedule(PLAN(), 3, 3, outputs_read=False, skip_dead_work=False)
  assert steps == (B(False, 0, "insert"), B(True, 1, "insert"), B(True, 2, "insert"))


def test_shallow_and_first_k_blocks_keep_the_prompts_travelling():
  assert ps.schedule(PLAN(), 1, 3, outputs_read=False, skip_dead_work=True) == (
      B(False, 0, "insert"), B(), B())
  steps = ps.schedule(PLAN(layers=(0, 1)), 2, 4, outputs_read=False, skip_dead_work=True)
  assert steps == (B(False, 0, "kv"), B(False, 1, "insert"), B(), B())


def test_noexpand_removes_the_prompts_and_reverse_overwrites_patches():
  steps = ps.schedule(PLAN(layers=(0, 1), remove_at=2), 2, 4, outputs_read=False,
                      skip_dead_work=False)
  assert steps == (B(False, 0, "insert"), B(True, 1, "insert"), B(True), B())
  # With skipping, block 1's prompts are keys/values only: nothing to remove.
  steps = ps.schedule(PLAN(layers=(0, 1), remove_at=2), 2, 4, outputs_read=False,
                      skip_dead_work=True)
  assert steps == (B(False, 0, "kv"), B(False, 1, "kv"), B(), B())
  steps = ps.schedule(PLAN(layers=(2, 3), first_replaces=True), 2, 4, outputs_read=True,
                      skip_dead_work=True)
  assert steps == (B(), B(), B(True, 0, "kv"), B(False, 1, "insert"))


def test_add_location_adds_at_its_blocks():
  steps = ps.schedule(PLAN(location="add", layers=(0, 1)), 2, 3, outputs_read=False,
                      skip_dead_work=True)
  assert steps == (B(False, 0, "add"), B(False, 1, "add"), B())
  x = np.zeros((2, 5, 3), np.float32)
  prompts = np.arange(2 * 2 * 5 * 3, dtype=np.float32).reshape(2, 2, 5, 3)
  out, kv = ps.apply(x, steps[1], prompts, 5)
  assert kv is None
  np.testing.assert_array_equal(out, prompts[1])


def test_apply_drops_inserts_and_hands_keys_values():
  x = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
  prompts = -np.ones((1, 2, 2, 1), np.float32)
  out, kv = ps.apply(x, B(True, 0, "insert"), prompts, 2)
  np.testing.assert_array_equal(out[0, :, 0], [0, -1, -1, 3, 4, 5])
  out, kv = ps.apply(x, B(False, 0, "kv"), prompts, 2)
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(kv, prompts[0])


@pytest.mark.parametrize("plan, sets, message", [
    (PLAN(location="middle"), 1, "Unknown prompt location"),
    (PLAN(layers=(0, 5)), 2, "do not fit"),
    (PLAN(), 4, "do not fit"),
])
def test_bad_plans_are_refused(plan, sets, message):
  with pytest.raises(ValueError, match=message):
    ps.schedule(plan, sets, 3, outputs_read=False, skip_dead_work=True)
