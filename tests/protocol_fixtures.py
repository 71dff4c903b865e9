"""A protocol config with overrides, a stub run function and a small grid, shared by
the protocol tests."""

import json
import os

import checkpoint_fixtures
from configs import vtab_protocol


def protocol_config(arg="", **overrides):
  """configs/vtab_protocol.py with ``overrides`` ({"section.field": value}) set."""
  return checkpoint_fixtures.override(vtab_protocol.get_config(arg), overrides)


class StubRun:
  """Records calls; val top-1 from ``val`` {(lr, wd): score}, test from the seed."""

  def __init__(self, val=None, diverge_lr=None, fail_after=None):
    self.calls, self.val, self.diverge_lr, self.fail_after = [], val or {}, diverge_lr, fail_after

  def __call__(self, config, workdir):
    if self.fail_after is not None and len(self.calls) >= self.fail_after:
      raise KeyboardInterrupt("preempted")
    self.calls.append((config, workdir))
    lr, wd = config.optim.base_lr, config.optim.weight_decay
    if lr == self.diverge_lr:
      raise FloatingPointError("loss became nan at step 3")
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for step in range(1, 4):
        f.write(json.dumps({"step": step, "train/loss": 2.0 / step}) + "\n")
    results = {}
    if config.data.eval_split:
      results["val"] = {"top1": self.val.get((lr, wd), 0.5), "count": 200}
    if config.data.test_split:
      results["test"] = {"top1": 0.5 + config.seed / 10000, "count": 100}
    return results


# Two lrs, two weight decays, two seeds.
SMALL = dict(**{"protocol.lrs": (1.0, 0.5), "protocol.weight_decays": (1e-3, 0.0),
                "protocol.seeds": (42, 44)})
