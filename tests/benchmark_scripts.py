"""Loading a script of benchmarks/ (a folder of scripts, not a package) in a test."""

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")


def load(name: str):
  """benchmarks/<name>.py as a fresh module; benchmarks/ joins sys.path for the
  scripts' own ``import common`` / ``import train_step``."""
  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
