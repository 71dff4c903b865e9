"""Test-wide setup: CPU only, quiet TensorFlow, fast compiles, the repository and the
shared fixtures (the modules beside this file) on sys.path.

The test files live in folders that mirror the package (tests/models/test_vit.py
tests vpt_jax/models/vit.py); tests/integration/ holds the tests that run the
whole stack."""

import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny models: LLVM's optimisations would cost ~5x the compile time
# and save nothing. (Numerics do not depend on this flag.)
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
sys.path.insert(0, os.path.dirname(TESTS))


def pytest_configure(config):
  # run.py's compilation cache (on by default) goes to a directory of this test
  # session, never the user's ~/.cache; the runs the tests start inherit it.
  if "VPT_JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache_dir = tempfile.mkdtemp(prefix="vpt_jax_test_compile_cache_")
    os.environ["VPT_JAX_COMPILATION_CACHE_DIR"] = cache_dir
    config.add_cleanup(lambda: shutil.rmtree(cache_dir, ignore_errors=True))
  # CI runs these a second time under another XLA:CPU kernel choice
  # (XLA_FLAGS=--xla_cpu_max_isa=SSE4_2), so that a tolerance between two
  # computation paths that holds on one CPU only fails there, not on a user's.
  # The mark goes on each such test, not on a whole module: a refusal, a count, a
  # lowered program's dtypes or a memory figure in the same file does not depend
  # on the kernels' rounding and would only lengthen that pass.
  config.addinivalue_line(
      "markers", "numerics: compares two float32 computation paths (see tests/tolerances.py)")
  # That second pass leaves out the tests that start several JAX processes: the
  # rounding they allow for (a gradient summed as per-host partial sums) is the
  # one training/test_steps.py's one- vs four-device test checks in one process,
  # which the pass runs; their own subject (gloo, the preemption sync point,
  # each host's share of the data) does not depend on the kernels' ISA.
  config.addinivalue_line(
      "markers", "multiprocess: starts several JAX processes (skipped by CI's SSE4.2 pass)")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
  """A tiny 'pretrained' backbone written in the raw vision_transformer layout."""
  # Imported here: it imports JAX, which must start after the setup above.
  import checkpoint_fixtures  # pylint: disable=g-import-not-at-top
  return checkpoint_fixtures.write_tiny_backbone(
      tmp_path_factory.mktemp("backbone") / "ViT-test_4.npz")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data_dir of the module's own: local builders prepare into it."""
  return str(tmp_path_factory.mktemp("tfds"))
