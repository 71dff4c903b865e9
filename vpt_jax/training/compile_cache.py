"""JAX's persistent compilation cache: each step compiles once per shape, across runs.

A protocol runs the same step with the same shapes dozens of times (every
learning rate, weight decay and seed of a task), a resumed run recompiles what
it compiled before it stopped, and every evaluation compiles the eval step;
with the cache on, all but the first of these read the executable from disk.
The cache key covers the program, the shapes, the devices, jax/jaxlib and
XLA_FLAGS, so a stale entry is never reused; deleting the directory is always
safe.
"""

from __future__ import annotations

import os
from typing import Mapping

# Overrides the default directory (run.py's --compilation_cache_dir default).
DIR_ENV = "VPT_JAX_COMPILATION_CACHE_DIR"
# JAX writes only compiles slower than this (its default, 1 s, skips most CPU
# compiles of small models); lookups happen for every compile either way.
MIN_COMPILE_SECONDS = 0.1


def default_dir(environ: Mapping[str, str] = os.environ) -> str:
  """$VPT_JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/vpt_jax/jax_cache.

  XDG_CACHE_HOME defaults to ~/.cache, as the XDG base directory spec says.
  """
  if environ.get(DIR_ENV):
    return environ[DIR_ENV]
  cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "vpt_jax", "jax_cache")


def settings(directory: str | None,
             min_compile_seconds: float = MIN_COMPILE_SECONDS) -> dict[str, object]:
  """The jax.config settings that turn the cache on in ``directory`` (None: off)."""
  if directory is None:
    return {"jax_enable_compilation_cache": False}
  return {
      "jax_enable_compilation_cache": True,
      "jax_compilation_cache_dir": os.path.expanduser(directory),
      "jax_persistent_cache_min_compile_time_secs": min_compile_seconds,
      # -1: no minimum entry size (0 lets JAX pick one for the file system).
      "jax_persistent_cache_min_entry_size_bytes": -1,
  }


def configure(directory: str | None, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> None:
  """Turns the cache on in ``directory`` (None: off) here and in child processes.

  Call before the first compile. The settings also go to the environment
  (JAX reads JAX_<NAME> when it is imported), so worker processes that the
  suites spawn use the same cache.
  """
  import jax  # pylint: disable=g-import-not-at-top
  for name, value in settings(directory, min_compile_seconds).items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
