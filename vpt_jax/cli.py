"""What run.py does for each mode; kept out of run.py so it can be tested."""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import sys
from typing import Optional, Sequence

import ml_collections

from vpt_jax import errors

MODES = ("train", "evaluate", "export", "predict", "report", "fingerprint",
         "e2vpt_masks")  # E2VPT's pruning levels from a trained run (training/e2vpt_masks)


def _config_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  paths = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    paths.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      paths.extend(_config_paths(value, f"{path}."))
  return paths


SHIPPED_PREFIX = "vpt_jax:"


def shipped_configs_dir() -> str:
  """The directory of the shipped configs: configs/ of a checkout, vpt_jax/configs installed.

  A wheel installs the repository's configs/ as the package ``vpt_jax.configs``
  (pyproject.toml); a plain checkout has it beside the package.
  """
  if importlib.util.find_spec("vpt_jax.configs") is not None:
    return os.path.dirname(importlib.util.find_spec("vpt_jax.configs").origin)
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config_spec(spec: str) -> str:
  """"vpt_jax:NAME[:ARG]" -> "/path/to/configs/NAME.py[:ARG]"; other specs unchanged.

  Lets an installed package run its shipped configs from any directory:
  ``vpt-jax --config=vpt_jax:quickstart:ci`` is ``--config=configs/quickstart.py:ci``.
  """
  if not spec.startswith(SHIPPED_PREFIX):
    return spec
  name, _, arg = spec[len(SHIPPED_PREFIX):].partition(":")
  folder = shipped_configs_dir()
  path = os.path.join(folder, name.removesuffix(".py") + ".py")
  if not name or not os.path.isfile(path):
    shipped = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py")
                     and not f.startswith("_") and f != "common.py")
    raise ValueError(f"no shipped config {name!r}: use {SHIPPED_PREFIX}NAME[:ARG] with NAME "
                     f"one of {', '.join(shipped)} (files in {folder})")
  return f"{path}:{arg}" if arg else path


def resolve_config_argv(argv: Sequence[str]) -> list[str]:
  """argv with each --config=vpt_jax:NAME (or --config vpt_jax:NAME) made a file path."""
  resolved = list(argv)
  for i, arg in enumerate(resolved):
    if arg.startswith("--config="):
      resolved[i] = "--config=" + resolve_config_spec(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(resolved):
      resolved[i + 1] = resolve_config_spec(resolved[i + 1])
  return resolved


def make_configs_importable() -> None:
  """Lets config files say ``from configs import common`` wherever the command runs.

  In a checkout the repository root is on sys.path (run.py's folder, or the
  working directory for ``python -m vpt_jax``); an installed package (or the
  console script) has no top-level ``configs``, so it is an alias of
  ``vpt_jax.configs`` there. An importable ``configs`` is left alone.
  """
  if importlib.util.find_spec("configs") is not None:
    return
  folder = shipped_configs_dir()
  module_spec = importlib.util.spec_from_file_location(
      "configs", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
  module = importlib.util.module_from_spec(module_spec)
  sys.modules["configs"] = module
  module_spec.loader.exec_module(module)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads "path/to/config.py[:arg]" the way --config does, for early checks."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise errors.UserError(f"config file {path!r} does not exist; configs live in configs/, "
                           "e.g. --config=configs/vpt.py:method=vpt_deep (installed: "
                           f"--config={SHIPPED_PREFIX}vpt:method=vpt_deep)")
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


def export_tasks(tasks: str, output: str, backbone_path: str = "",
                 export_format: str = "stablehlo", batch_size: int = 0,
                 platforms: str = "cpu,cuda,tpu") -> str:
  """run.py --mode=export --tasks=...: the stacked model of many task exports, standalone.

  Writes ``output``/model.stablehlo (or saved_model/) and model.json
  (``export.standalone.export_tasks``); prints and returns ``output``.
  """
  from vpt_jax.export import standalone  # pylint: disable=g-import-not-at-top
  directory = standalone.export_tasks(
      parse_task_exports(tasks), output, export_format=export_format,
      backbone_path=backbone_path or None, batch_size=batch_size, platforms=platforms)
  print(directory)
  return directory


def _print_json_lines(results: list[dict], output: str = "") -> list[dict]:
  """Prints one JSON line per result (and writes them to ``output``); returns ``results``."""
  lines = [json.dumps(result) for result in results]
  for line in lines:
    print(line)
  if output:
    with open(output, "w") as f:
      f.write("".join(line + "\n" for line in lines))
  return results


def fingerprint_splits(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode fingerprint: the fingerprints of the config's train, eval and test splits.

  What a run records in results.json["data"] (``data.fingerprints``), without
  training: printed as JSON and written to WORKDIR/data_fingerprints.json.
  """
  from vpt_jax.data import fingerprints  # pylint: disable=g-import-not-at-top
  from vpt_jax.data import sources  # pylint: disable=g-import-not-at-top
  problem = sources.check_data_config(config.data)
  if problem:
    raise errors.UserError(problem)
  found = {field: dict(fingerprints.config_fingerprint(config, config.data[field]),
                       split=config.data[field])
           for field in sources.SPLIT_FIELDS if config.data[field]}
  text = json.dumps(found, indent=1, sort_keys=True)
  print(text)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "data_fingerprints.json"), "w") as f:
    f.write(text + "\n")
  return found


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
  if "few_shot" in config:  # configs/few_shot_protocol.py
    from vpt_jax.protocol import few_shot_protocol  # pylint: disable=g-import-not-at-top
    from vpt_jax.protocol import report  # pylint: disable=g-import-not-at-top
    if mode not in ("train", "report"):
      raise errors.UserError("few-shot protocol configs support --mode train (run or resume "
                             "the grid) and --mode report")
    return (report.write_report(workdir) if mode == "report"
            else few_shot_protocol.run_protocol(config, workdir))
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
  if mode == "fingerprint":
    return fingerprint_splits(config, workdir)
  if mode in ("evaluate", "export"):
    return trainer.from_checkpoint(config, workdir, mode)
  if mode == "e2vpt_masks":
    from vpt_jax.training import e2vpt_masks  # pylint: disable=g-import-not-at-top
    return e2vpt_masks.write_pruning_levels(config, workdir)
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
