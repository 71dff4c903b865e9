r"""The command line: flags, their cross-checks and the call into ``cli``.

``run.py``, ``python -m vpt_jax`` and the ``vpt-jax`` console script all call
``run()``; run.py has more examples. Installed, from any directory:

  vpt-jax --config=vpt_jax:quickstart --workdir=/tmp/vpt_quickstart
  vpt-jax --config=vpt_jax:vpt:method=vpt_deep,builder=dmlab --workdir=/tmp/dmlab \
      --config.model.init_checkpoint=/data/ViT-B_16.npz
  vpt-jax --config=my_config.py --workdir=DIR   # a file may `from configs import common`
"""


import os
import re
import sys
import tempfile

# TensorFlow's C++ INFO and WARNING lines stay off the console (set before anything
# imports TensorFlow; TF 2.21 logs its oneDNN notice before it reads this, see
# _import_tensorflow_quietly). --verbosity brings absl's (and orbax's) INFO lines back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from vpt_jax.training import xla_cpu  # pylint: disable=g-import-not-at-top

# Before anything creates JAX's backend: the memory-minimising XLA:CPU
# scheduler (as fast, a lower peak; XLA_FLAGS that choose one win).
xla_cpu.use_scheduler("memory")

# What TensorFlow's C++ prints while it loads, whatever TF_CPP_MIN_LOG_LEVEL says.
_TF_LOAD_NOTICES = re.compile(
    r"oneDNN custom operations are on|All log messages before absl::InitializeLog"
    r"|cpu_feature_guard|To enable the following instructions")


def _import_tensorflow_quietly(argv) -> None:
  """Imports TensorFlow with its load-time notices kept off the console.

  TF 2.21 logs "oneDNN custom operations are on" from C++ while its libraries
  load (twice, each after absl's "All log messages before absl::InitializeLog()
  ..."), before TF_CPP_MIN_LOG_LEVEL is read, so only file descriptor 2 can
  catch it: it points at a temporary file during the import, and every line
  but these notices is passed on. With --verbosity, nothing is held back.
  """
  if any(re.match(r"--?(v|verbosity)(=|$)", arg) for arg in argv):
    import tensorflow  # pylint: disable=unused-import
    return
  sys.stderr.flush()
  console = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=redefined-outer-name
    finally:
      os.dup2(console, 2)
      os.close(console)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors="replace").splitlines()
              if not _TF_LOAD_NOTICES.search(line)]
      if kept:
        print("\n".join(kept), file=sys.stderr)
  # TensorFlow's Python warnings (deprecations inside tf.image) stay off too.
  tensorflow.get_logger().setLevel("ERROR")


_import_tensorflow_quietly(sys.argv[1:])

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vpt_jax import cli
from vpt_jax import errors
from vpt_jax.training import compile_cache

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: file.py:key=value,...; "
    "vpt_jax:NAME[:ARG] is the shipped configs/NAME.py (e.g. vpt_jax:quickstart:ci).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, "
                               "results and exports.")
_MODE = flags.DEFINE_enum("mode", "train", cli.MODES,
                          "train (or resume), evaluate the latest checkpoint, export it, "
                          "or predict image files with an export.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host: TPU pod "
    "slices and SLURM/MPI clusters are detected automatically).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for --distributed by hand.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "On a CPU host: split it into this many XLA devices and shard every "
    "batch over them as over a pod's chips. XLA:CPU runs attention's batched matmuls on one "
    "thread per device, so one device per core is faster (about 15% for ViT-B/16 on 2 "
    "cores); 0 keeps JAX's default of one device.", lower_bound=0)
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep compiled steps in --compilation_cache_dir so that later "
    "runs with the same shapes (other hyper-parameters, seeds, resumes, evaluations) skip "
    "compiling; --nocompilation_cache turns JAX's persistent cache off.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", compile_cache.default_dir(), "Directory (or gs:// path) of the "
    f"compilation cache; default ${compile_cache.DIR_ENV}, else "
    "$XDG_CACHE_HOME/vpt_jax/jax_cache (~/.cache/vpt_jax/jax_cache). Safe to delete.")
_TASKS = flags.DEFINE_string(
    "tasks", None, "--mode=predict (or export: one standalone model) on many tasks sharing "
    "one backbone: name=export_dir,... (then no --config/--workdir; the exports describe "
    "their models).")
_INPUTS = flags.DEFINE_string("inputs", None, "With --tasks: task:image_path,... or a .csv "
                              "file with the columns task,file.")
_BACKBONE = flags.DEFINE_string("backbone", None, "With --tasks: the backbone file (default: "
                                "the path the exports recorded).")
_OUTPUT = flags.DEFINE_string("output", None, "With --tasks: also write the JSON lines here "
                              "(predict), or the standalone model's directory (export).")
_EXPORT_FORMAT = flags.DEFINE_enum("export_format", "stablehlo", ["stablehlo", "saved_model"],
                                   "With --mode=export --tasks: the standalone model's format.")
_EXPORT_BATCH_SIZE = flags.DEFINE_integer(
    "export_batch_size", 0, "With --mode=export --tasks: 0 = any batch size, else fixed.",
    lower_bound=0)
_EXPORT_PLATFORMS = flags.DEFINE_string("export_platforms", "cpu,cuda,tpu",
                                        "With --mode=export --tasks: lowered for these.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the Python traceback of a user error (bad "
                           "config, flags, files or data) instead of its one-line message.")


@flags.multi_flags_validator(
    ["config", "workdir", "tasks"],
    message="--config and --workdir are required (except with --mode=predict --tasks=...)")
def _config_and_workdir_given(values):
  return bool(values["tasks"]) or (values["config"] is not None
                                    and values["workdir"] is not None)


@flags.multi_flags_validator(
    ["tasks", "inputs", "backbone", "output"],
    message="--inputs, --backbone and --output serve task exports: pass them with "
            "--mode=predict --tasks=name=export_dir,... (a --config run reads its images from "
            "--config.predict.images)")
def _serving_flags_only_with_tasks(values):
  return bool(values["tasks"]) or not any(
      values[name] is not None for name in ("inputs", "backbone", "output"))


def main(argv):
  """Runs the mode; a user's mistake ends as one line and exit status 2."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # absl and orbax INFO lines off by default
  try:
    _dispatch(argv)
  except errors.UserError as error:
    if _DEBUG.value:
      raise
    print(f"run.py: error: {error}", file=sys.stderr)
    sys.exit(2)


def _dispatch(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CPU_DEVICES.value:
    cli.set_cpu_devices(_CPU_DEVICES.value)
  compile_cache.configure(_COMPILATION_CACHE_DIR.value if _COMPILATION_CACHE.value else None)
  if _DISTRIBUTED.value:
    cli.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _TASKS.value:
    if (_MODE.value not in ("predict", "export") or _CONFIG.value is not None
        or _WORKDIR.value is not None):
      raise app.UsageError("--tasks serves task exports: use it with --mode=predict and "
                           "--inputs (or --mode=export and --output), without "
                           "--config/--workdir (the exports hold the models)")
    if _MODE.value == "export":
      if not _OUTPUT.value or _INPUTS.value:
        raise app.UsageError("--mode=export --tasks=... writes one model: give --output=DIR "
                             "(and no --inputs)")
      cli.export_tasks(_TASKS.value, _OUTPUT.value, _BACKBONE.value or "",
                       _EXPORT_FORMAT.value, _EXPORT_BATCH_SIZE.value, _EXPORT_PLATFORMS.value)
      return
    if not _INPUTS.value:
      raise app.UsageError("--tasks needs --inputs=task:image_path,... (or a .csv file)")
    cli.predict_tasks(_TASKS.value, _INPUTS.value, _BACKBONE.value or "", _OUTPUT.value or "")
    return
  cli.run(_CONFIG.value, _WORKDIR.value, _MODE.value)


def run() -> None:
  """Checks the command line before absl parses it (one clear line), then runs ``main``.

  ``--config=vpt_jax:NAME[:ARG]`` names a shipped config (configs/NAME.py) from any
  working directory.
  """
  cli.make_configs_importable()
  try:
    argv = cli.resolve_config_argv(sys.argv)
  except ValueError as e:
    sys.exit(f"run.py: --config: {e}")
  problem = cli.check_command_line(argv[1:])
  if problem:
    sys.exit(f"run.py: {problem}")
  _list_flags_in_help()
  app.run(main, argv=argv)


def _list_flags_in_help() -> None:
  """--help shows this module's flags (absl lists the key flags of the file that ran)."""
  for flag in flags.FLAGS.flags_by_module_dict().get(__name__, []):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  entry_module = sys.modules["__main__"]
  if not entry_module.__doc__:  # the console script's wrapper has none
    entry_module.__doc__ = __doc__
