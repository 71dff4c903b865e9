"""The persistent compilation cache: where it lives, and that a recompile reads it."""

import json
import os
import subprocess
import sys
import textwrap

from vpt_jax.training import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_default_dir_follows_the_xdg_cache_home():
  assert compile_cache.default_dir({"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/vpt_jax/jax_cache"
  home = os.path.expanduser("~")
  assert compile_cache.default_dir({}) == f"{home}/.cache/vpt_jax/jax_cache"
  # An empty XDG_CACHE_HOME counts as unset (the XDG spec).
  assert compile_cache.default_dir({"XDG_CACHE_HOME": ""}) == f"{home}/.cache/vpt_jax/jax_cache"


def test_the_project_variable_overrides_the_default_dir():
  environ = {"XDG_CACHE_HOME": "/x/cache", compile_cache.DIR_ENV: "/scratch/jit"}
  assert compile_cache.default_dir(environ) == "/scratch/jit"


def test_settings_cache_every_entry_size_and_off_is_one_switch():
  on = compile_cache.settings("/c", min_compile_seconds=0.5)
  assert on == {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": "/c",
                "jax_persistent_cache_min_compile_time_secs": 0.5,
                "jax_persistent_cache_min_entry_size_bytes": -1}
  assert compile_cache.settings(None) == {"jax_enable_compilation_cache": False}


# Compiles a function, drops JAX's in-memory caches and compiles it again; prints
# the cache hits JAX reports in each pass (jnp.ones compiles too) and what a child process sees in its environment.
_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax, jax.numpy as jnp
    from vpt_jax.training import compile_cache
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
    compile_cache.configure(sys.argv[1] or None, min_compile_seconds=0.0)
    f = lambda x: jnp.tanh(x @ x.T).sum()
    jax.jit(f)(jnp.ones((8, 8))).block_until_ready()
    first = len(hits)
    jax.clear_caches()
    jax.jit(f)(jnp.ones((8, 8))).block_until_ready()
    print(json.dumps({"first": first, "second": len(hits) - first, "env": os.environ.get("JAX_ENABLE_COMPILATION_CACHE"),
                      "env_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR")}))
    """)


def _run(directory: str, extra_env: dict) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO, **extra_env)
  out = subprocess.run([sys.executable, "-c", _SCRIPT, directory], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_recompile_reads_the_cache_and_children_inherit_it(tmp_path):
  cache = str(tmp_path / "cache")
  seen = _run(cache, {})
  assert seen["first"] == 0 and seen["second"] >= 1
  assert seen["env"] == "true" and seen["env_dir"] == cache
  assert os.listdir(cache)  # the entry is on disk, for the next process


def test_off_writes_nothing_even_when_jax_was_told_a_directory(tmp_path):
  cache = tmp_path / "cache"
  seen = _run("", {"JAX_COMPILATION_CACHE_DIR": str(cache)})
  assert seen["first"] == seen["second"] == 0 and seen["env"] == "false"
  assert not cache.exists() or not os.listdir(cache)
