"""Test-wide setup: CPU only, quiet TensorFlow, fast compiles, the repository on sys.path."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny models: LLVM's optimisations would cost ~5x the compile time
# and save nothing. (Numerics do not depend on this flag.)
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
  # CI runs these a second time under another XLA:CPU kernel choice
  # (XLA_FLAGS=--xla_cpu_max_isa=SSE4_2), so that a tolerance between two
  # computation paths that holds on one CPU only fails there, not on a user's.
  config.addinivalue_line(
      "markers", "numerics: compares two float32 computation paths (see tests/tolerances.py)")
