"""``python -m vpt_jax ...``: the same command line as run.py."""

from vpt_jax import main

main.run()
