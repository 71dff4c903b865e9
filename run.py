r"""Command-line entry point: parses flags and calls into vpt_jax.

  python run.py --config configs/quickstart.py --workdir /tmp/quickstart
  python run.py --config configs/vpt.py:method=vpt_deep,num_prompts=50,builder=dmlab \
      --workdir /tmp/dmlab [--mode train|evaluate|export|predict]
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from vpt_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: file.py:key=value,...",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, "
                               "results and exports.")
_MODE = flags.DEFINE_enum("mode", "train", cli.MODES,
                          "train (or resume), evaluate the latest checkpoint, export it, "
                          "or predict image files with an export.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
  problem = cli.check_command_line(sys.argv[1:])
  if problem:
    sys.exit(f"run.py: {problem}")
  app.run(main)
