"""What run.py does for each mode; kept out of run.py so it can be tested."""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from typing import Optional, Sequence

import ml_collections

from vpt_jax import errors

MODES = ("train", "evaluate", "export", "predict", "report")


def _config_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  paths = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    paths.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      paths.extend(_config_paths(value, f"{path}."))
  return paths


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads "path/to/config.py[:arg]" the way --config does, for early checks."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise errors.UserError(f"config file {path!r} does not exist; configs live in configs/, "
                           "e.g. --config=configs/vpt.py:method=vpt_deep")
  module_spec = importlib.util.spec_from_file_location("_checked_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def set_cpu_devices(count: int) -> None:
  """Exposes ``count`` XLA CPU devices; must run before JAX creates its backends."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:
    raise RuntimeError(f"--cpu_devices={count} came too late: JAX had already created its "
                       f"devices ({e}); pass it before anything else runs") from e


def check_command_line(argv: Sequence[str]) -> Optional[str]:
  """Finds bad --config arguments and overrides before absl parses them.

  absl reports these as bare KeyErrors; this names the problem and the closest
  valid keys. Returns the error message, or None when the command line is fine.
  """
  argv = list(argv)
  config_spec = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      config_spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      config_spec = argv[i + 1]
  if config_spec is None:
    return None
  try:
    config = load_config_file(config_spec)
  except ValueError as e:
    return f"--config={config_spec}: {e}"
  valid = _config_paths(config)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
      return (f"unknown config key {key!r} in {arg!r}"
              + (f"; did you mean {', '.join(close)}?" if close else "")
              + " (configs/common.py lists every field)")
  return None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Joins a multi-process JAX job before any device is touched.

  Without arguments JAX detects TPU pod slices, SLURM and Open MPI; CPU-only
  jobs exchange collectives through gloo.
  """
  import jax  # pylint: disable=g-import-not-at-top
  # Affects only the CPU backend; asking which backend runs would start it too early.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def _split_pairs(text: str, sep: str, flag: str, usage: str) -> list[tuple[str, str]]:
  """"a<sep>b,c<sep>d" -> [(a, b), (c, d)], split at the first ``sep`` of each item.

  Raises:
    ValueError: an item without ``sep`` or with an empty side, naming ``flag``
      and the item, followed by ``usage``.
  """
  pairs = []
  for item in (part.strip() for part in text.split(",")):
    if not item:
      continue
    key, found, value = item.partition(sep)
    if not found or not key or not value:
      raise errors.UserError(f"{flag} item {item!r} {usage}")
    pairs.append((key, value))
  return pairs


def parse_task_exports(text: str) -> dict[str, str]:
  """"name1=dir1,name2=dir2" -> {name: export directory} (run.py --tasks)."""
  exports = {}
  for name, directory in _split_pairs(text, "=", "--tasks", "must be name=export_dir, e.g. "
                                      "--tasks=cifar=/exports/cifar,dtd=/exports/dtd"):
    if name in exports:
      raise errors.UserError(f"--tasks names task {name!r} twice")
    exports[name] = directory
  if not exports:
    raise errors.UserError("--tasks is empty; give name=export_dir pairs")
  return exports


def parse_predict_inputs(text: str) -> list[tuple[str, str]]:
  """run.py --inputs -> [(task, image path)].

  ``text`` is either comma-separated "task:path" pairs (the path may itself
  contain ':', e.g. gs://...) or the path of a .csv file with a header row and
  the columns ``task`` and ``file``.
  """
  text = text.strip()
  if text.endswith(".csv"):
    import csv  # pylint: disable=g-import-not-at-top
    if not os.path.exists(text):
      raise errors.UserError(f"--inputs file {text!r} does not exist")
    with open(text, newline="") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {"task", "file"} <= set(reader.fieldnames):
        raise errors.UserError(f"{text}: the first row must name the columns 'task' and 'file', "
                               f"got {reader.fieldnames}")
      pairs = [(row["task"].strip(), row["file"].strip()) for row in reader]
  else:
    pairs = _split_pairs(text, ":", "--inputs", "must be task:image_path, e.g. "
                         "--inputs=cifar:a.png,dtd:b.jpg (or a .csv with task,file columns)")
  if not pairs:
    raise errors.UserError("--inputs lists no images; give task:path pairs or a .csv file")
  return pairs


def predict_tasks(tasks: str, inputs: str, backbone_path: str = "", output: str = "",
                  top_k: int = 5, batch_size: int = 32) -> list[dict]:
  """run.py --mode=predict --tasks=...: many task exports on one backbone.

  Prints one JSON line per input ({"task", "file", "class", "probability",
  "classes"}, see ``serving.MultiTaskServer.classify_files``) and, with
  ``output``, writes the same lines to that file. Returns the results.
  """
  from vpt_jax.export import serving  # pylint: disable=g-import-not-at-top
  exports = parse_task_exports(tasks)
  pairs = parse_predict_inputs(inputs)
  unknown = sorted({task for task, _ in pairs} - set(exports))
  if unknown:
    raise errors.UserError(f"--inputs names tasks {unknown} that --tasks does not load; "
                           f"loaded: {sorted(exports)}")
  server = serving.MultiTaskServer(exports, backbone_path or None)
  return _print_json_lines(server.classify_files(pairs, top_k=top_k, batch_size=batch_size),
                           output)


def _print_json_lines(results: list[dict], output: str = "") -> list[dict]:
  """Prints one JSON line per result (and writes them to ``output``); returns ``results``."""
  lines = [json.dumps(result) for result in results]
  for line in lines:
    print(line)
  if output:
    with open(output, "w") as f:
      f.write("".join(line + "\n" for line in lines))
  return results


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train"):
  """Dispatches one command; returns what the mode produced."""
  # Imported here so that `run.py --help` stays fast.
  from vpt_jax.export import predict  # pylint: disable=g-import-not-at-top
  from vpt_jax.suites import pretrain_sprites  # pylint: disable=g-import-not-at-top
  from vpt_jax.suites import quickstart  # pylint: disable=g-import-not-at-top
  from vpt_jax.training import trainer  # pylint: disable=g-import-not-at-top
  suites = {"quickstart": quickstart.run_suite, "pretrain_sprites": pretrain_sprites.run}

  if mode not in MODES:
    raise errors.UserError(f"Unknown mode {mode!r}; choose one of {MODES}")
  if "suite" in config:
    if mode != "train" or config.suite not in suites:
      raise errors.UserError(f"suite {config.suite!r}: known suites {sorted(suites)} run with "
                             "--mode train only")
    return suites[config.suite](config, workdir)
  if "protocol" in config:
    from vpt_jax.protocol import report  # pylint: disable=g-import-not-at-top
    from vpt_jax.protocol import tuning  # pylint: disable=g-import-not-at-top
    if mode == "report":
      return report.write_report(workdir)
    if mode != "train":
      raise errors.UserError("protocol configs support --mode train (run or resume the "
                             "protocol) and --mode report")
    return tuning.run_protocol(config, workdir)
  if mode == "report":
    raise errors.UserError("--mode report reads a protocol's results folder: use it with a "
                           "protocol config (configs/vtab_protocol.py), or run "
                           "python -m vpt_jax.protocol.report WORKDIR")
  if mode == "train":
    return trainer.train_and_evaluate(config, workdir)
  if mode in ("evaluate", "export"):
    return trainer.from_checkpoint(config, workdir, mode)
  paths = [p for p in config.predict.images.split(",") if p]
  if not paths:
    raise errors.UserError("predict mode needs --config.predict.images=a.png,b.jpg")
  export_dir = config.predict.export_dir or f"{workdir}/export"
  return _print_json_lines(predict.predict_files(
      export_dir, paths, backbone_path=_predict_backbone(export_dir,
                                                         config.model.init_checkpoint)))


def _predict_backbone(export_dir: str, configured: str) -> Optional[str]:
  """The backbone to predict with: the one the export recorded (None), if it is on disk.

  A config's ``model.init_checkpoint`` is often its default (the gs:// ViT-B/16),
  not the file the export was trained on; that one is recorded with its sha256
  (checked on load). Only when the recorded file is not here is the configured
  one used (its fingerprint is checked against the recorded one all the same).
  """
  from vpt_jax.export import task_export  # pylint: disable=g-import-not-at-top
  metadata_path = os.path.join(export_dir, task_export.METADATA_FILE)
  recorded = None
  if os.path.exists(metadata_path):
    with open(metadata_path) as f:
      recorded = (json.load(f).get("backbone") or {}).get("path")
  if recorded and os.path.exists(recorded):
    return None
  return configured or None
