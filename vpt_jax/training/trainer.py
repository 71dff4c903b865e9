"""Train, evaluate, checkpoint and export one run described by a config.

``train_and_evaluate(config, workdir)`` is the whole main job: build the data
and the model, load the backbone, freeze it, tune the trainable parameters on
a device mesh, evaluate with padded and masked batches, checkpoint with orbax
(a rerun of the same command resumes) and export the task.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import threading
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.checkpoints import train_state as ckpt_lib
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.data import pipeline
from vpt_jax.data import sources
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.training import metric_writers
from vpt_jax.training import optimizers
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import steps as steps_lib

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
# Fields (dotted names, as ``config_fields`` gives them; a trailing "." covers a
# section) that may differ between the run that wrote a checkpoint and a resume.
RESUME_NEUTRAL_FIELDS = ("log_every_steps", "eval.", "checkpoint.", "export",
                         "predict.", "data.data_dir",
                         # memory/time trade-offs of the same step (e.g. resuming
                         # on a smaller device): remat is exact, accumulation
                         # equal up to float summation order
                         "model.remat", "optim.accumulation_steps")


# Exit status of a run stopped by a preemption notice after saving (EX_TEMPFAIL:
# "try again"): schedulers can tell it from success and from failure.
PREEMPTED_EXIT_CODE = 75


class ConfigError(ValueError):
  """A config that cannot run; raised before any compute."""


class Preempted(SystemExit):
  """Training stopped at a step boundary after a preemption notice and a save."""

  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step


class PreemptionNotice:
  """Turns SIGTERM (the TPU/VM preemption notice) into a flag read at step boundaries.

  Single process only. On multi-host runs ``jax.distributed.initialize`` has
  installed JAX's preemption service, which owns SIGTERM: a notice on any host
  makes orbax's ``reached_preemption`` (JAX's preemption sync point) true on
  every host at the same step. A Python handler would replace it, and the host
  that got the signal would stop alone while the others wait in a collective,
  so none is installed there. Restores the previous handler on exit.
  """

  def __init__(self):
    self.received = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def normalization(config) -> dict:
  """{"mean": (3,), "std": (3,)} for config.data.normalization."""
  try:
    return normalization_lib.mean_std(config.data.normalization)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def source(config, split: str) -> pipeline.AnySource:
  """The split of config.data (a TFDS dataset, a VTAB/FGVC task or image files)."""
  return sources.make_source(config.data, split)


def validate_config(config) -> None:
  """Everything that can be checked without data or compute."""
  method = registry.get_method(config.method)
  factory.validate_spec(factory.model_spec(config))
  data_problem = sources.check_data_config(config.data)
  if data_problem:
    raise ConfigError(data_problem)
  optim = config.optim
  if optim.name and optim.name not in optimizers.OPTIMIZERS:
    raise ConfigError(f"Unknown optim.name {optim.name!r}; choose one of "
                      f"{optimizers.OPTIMIZERS} or '' for the method's default")
  if optim.schedule_unit not in optimizers.SCHEDULE_UNITS:
    raise ConfigError(f"optim.schedule_unit must be one of {optimizers.SCHEDULE_UNITS}")
  if optim.batch_size < 1 or optim.epochs <= 0:
    raise ConfigError("optim.batch_size and optim.epochs must be positive")
  if not 0 <= optim.warmup_epochs <= optim.epochs:
    raise ConfigError(f"optim.warmup_epochs {optim.warmup_epochs} must lie in "
                      f"[0, epochs={optim.epochs}]")
  try:
    steps_lib.check_accumulation(
        optim.accumulation_steps, optim.batch_size,
        batch_norm=method.head_hidden_layers > 0)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  normalization(config)
  if config.model.init_checkpoint and not tf.io.gfile.exists(config.model.init_checkpoint):
    raise ConfigError(
        f"Backbone checkpoint {config.model.init_checkpoint!r} does not exist. Download "
        "it (e.g. gs://vit_models/imagenet21k/ViT-B_16.npz) or pass a local path with "
        "--config.model.init_checkpoint=PATH ('' trains from scratch).")
  side_checkpoint = config.sidetune.checkpoint
  if side_checkpoint and method.name != "sidetune":
    raise ConfigError(
        f"sidetune.checkpoint={side_checkpoint!r} is only read by method 'sidetune', not "
        f"{config.method!r}; drop --config.sidetune.checkpoint or use --config.method=sidetune")
  if side_checkpoint and not tf.io.gfile.exists(side_checkpoint):
    raise ConfigError(
        f"Side-network checkpoint {side_checkpoint!r} does not exist. Pass a file written "
        "by sidetune.save_side_network, or --config.sidetune.checkpoint='' to start the "
        "side network from its initialisation.")


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and proves it is writable, before any compute."""
  try:
    tf.io.gfile.makedirs(workdir)
    probe = os.path.join(workdir, f".write-probe-{os.getpid()}")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    raise ConfigError(f"workdir {workdir!r} is not writable ({e}); choose a directory "
                      "you can write to with --workdir") from e


def config_fields(config) -> dict:
  """Every field of a config by its dotted name: {"optim.batch_size": 128, ...}.

  ``config``: a ConfigDict, or the nested dict of its JSON (e.g. config.json).
  """
  tree = config if isinstance(config, dict) else json.loads(config.to_json_best_effort())
  return {path.replace("/", "."): value
          for path, value in trees.flatten(tree).items()}


def in_fields(field: str, prefixes) -> bool:
  """Whether the dotted ``field`` starts with one of ``prefixes`` ("eval." covers a section)."""
  return any(field.startswith(p) for p in prefixes)


def check_resume_config(workdir: str, config) -> None:
  """Refuses to resume a workdir whose checkpoint came from a different config."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = config_fields(config)
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      previous = config_fields(json.load(f))
    differing = sorted(key for key in set(previous) | set(current)
                       if previous.get(key) != current.get(key)
                       and not in_fields(key, RESUME_NEUTRAL_FIELDS))
    has_checkpoint = tf.io.gfile.exists(os.path.join(workdir, "checkpoints"))
    if differing and has_checkpoint and not config.get("allow_config_change", False):
      details = "; ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}"
                          for k in differing)
      raise ConfigError(
          f"{workdir} holds a checkpoint from a different config ({details}). Use a new "
          "--workdir, or rerun with the original config.")
  if jax.process_index() == 0:
    with tf.io.gfile.GFile(path, "w") as f:
      f.write(config.to_json_best_effort(indent=2))


@dataclasses.dataclass
class TrainData:
  """The (small) training split, decoded once and kept as uint8."""
  # uint8 (N, S, S, 3), or for data.preprocess="resize_crop_flip" a list of N
  # uint8 (H, W, 3) with shorter side 256/224 * S (pipeline.load_train_set).
  images: np.ndarray
  labels: np.ndarray  # (N,) int32
  num_classes: int
  class_names: Optional[list]


def load_train_data(config) -> TrainData:
  """Decodes the training split and checks the labels against the classes."""
  train_source = source(config, config.data.train_split)
  meta_classes = pipeline.num_classes(train_source)
  num_classes = config.data.num_classes or meta_classes
  if config.data.num_classes and meta_classes and config.data.num_classes != meta_classes:
    raise ConfigError(
        f"config.data.num_classes={config.data.num_classes} but {train_source.builder} "
        f"(label {config.data.label_key!r}) has {meta_classes} classes; set "
        f"--config.data.num_classes={meta_classes} (or 0 to take it from the dataset)")
  # Every process keeps the whole split; train_batch picks its rows.
  images, labels = pipeline.load_train_set(
      train_source, image_size=config.model.image_size, resize=config.data.resize,
      preprocess=config.data.preprocess)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ConfigError(f"training labels span [{labels.min()}, {labels.max()}] but the "
                      f"model has {num_classes} classes; fix data.num_classes")
  return TrainData(images, labels, num_classes, pipeline.class_names(train_source))


def parameter_overview(params, labels, backbone_size: int) -> str:
  """A table of trainable and frozen parameters per top-level module."""
  flat_labels = trees.flatten(labels)
  groups: dict[str, list[int]] = {}
  for path, value in trees.flatten(params).items():
    row = groups.setdefault(path.split("/")[0], [0, 0])
    row[flat_labels[path] != freezing.TRAIN] += int(np.prod(value.shape))
  lines = [f"{'module':<16}{'trainable':>14}{'frozen':>14}"]
  for name, (trainable, frozen) in sorted(groups.items()):
    lines.append(f"{name:<16}{trainable:>14,}{frozen:>14,}")
  total_trainable = sum(t for t, _ in groups.values())
  total = sum(t + f for t, f in groups.values())
  lines.append(f"{'total':<16}{total_trainable:>14,}{total - total_trainable:>14,}")
  lines.append(f"trainable: {total_trainable:,} of {total:,} = "
               f"{100 * total_trainable / max(total, 1):.3f}% "
               f"({100 * total_trainable / max(backbone_size, 1):.3f}% of the "
               f"{backbone_size:,}-parameter backbone)")
  return "\n".join(lines)


def backbone_size(params, fresh=npz_lib.DEFAULT_FRESH) -> int:
  """Parameters of the backbone alone: all but those matching a ``fresh`` regex.

  Pass the method's ``fresh_patterns`` (head and the method's own parameters).
  """
  patterns = [re.compile(p) for p in fresh]
  return sum(int(np.prod(v.shape)) for p, v in trees.flatten(params).items()
             if not any(pattern.fullmatch(p) for pattern in patterns))


def evaluate(run: Run, eval_step, variables, split: str) -> dict:
  """Top-1/top-5/loss over every example of ``split`` exactly once.

  ``variables``: ``steps_lib.model_variables(state)``.
  """
  return steps_lib.summarize_eval(eval_totals(run, eval_step, variables, split))


def eval_stream_options(config) -> dict:
  """This process's keyword arguments of ``pipeline.eval_dataset``/``eval_batches``."""
  return dict(image_size=config.model.image_size,
              local_batch=config.eval.batch_size // jax.process_count(),
              resize=config.data.resize, process_index=jax.process_index(),
              process_count=jax.process_count(), preprocess=config.data.preprocess)


def eval_totals(run: Run, eval_step, variables, split: str) -> dict:
  """The sums of ``eval_step`` over every example of ``split``, on the host.

  Reads the run's one pipeline for the split (``Run.eval_input``).
  """
  config = run.config
  mesh_lib.check_batch_divisible(config.eval.batch_size, run.mesh)
  eval_source, dataset = run.eval_input(split)
  totals = None
  for batch in pipeline.eval_batches(eval_source, **eval_stream_options(config),
                                     dataset=dataset):
    sums = eval_step(variables, mesh_lib.global_batch(run.mesh, batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ConfigError(f"split {eval_source.split!r} of {eval_source.builder} is empty")
  return jax.device_get(totals)


def batches(data: TrainData, config, start_step: int,
            features: Optional[np.ndarray] = None) -> Iterator[dict]:
  """This process's training batches from ``start_step`` on, as every run draws them.

  Images, or the cached ``features`` (N, D) if given; the order (and any crop
  or flip) is a function of (seed, step), so a resumed or fused run gets the
  batches of an uninterrupted separate one.
  """
  for step, indices in enumerate(pipeline.train_batches(
      len(data.labels), global_batch=config.optim.batch_size, seed=config.seed,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count()), start_step):
    if features is not None:
      yield {"features": features[indices], "label": data.labels[indices]}
    else:  # crops and flips (data.preprocess) are a function of (seed, step)
      yield pipeline.train_batch(
          data.images, data.labels, indices, image_size=config.model.image_size,
          preprocess=config.data.preprocess, seed=config.seed, step=step,
          process_index=jax.process_index(), process_count=jax.process_count())


def uses_cached_features(config, labels) -> bool:
  """Whether the head can train on backbone features computed once.

  True when ``config.cache_features`` is on and the features are a fixed
  function of the image: only ``head/`` parameters train, the method adds no
  (possibly stochastic) parameters of its own (prompts, side network) and the
  backbone runs without dropout. The training data is not augmented (the
  pipeline decodes every image once), so linear and mlp-k qualify.
  """
  method = registry.get_method(config.method)
  trainable = [p for p, label in trees.flatten(labels).items()
               if label == freezing.TRAIN]
  return bool(config.cache_features and not method.fresh and not method.backbone_dropout
              and config.data.preprocess == "resize"  # no augmentation
              and all(p.startswith("head/") for p in trainable))


def compute_features(model, variables, images: np.ndarray, mesh, *, batch_size: int,
                     norm: dict) -> np.ndarray:
  """The pooled backbone features (N, D) float32 of uint8 images (N, S, S, 3).

  Eval mode, ``batch_size`` images per global batch (the last one padded), the
  rows split over the mesh; every process holds all N images (as
  ``load_train_data`` does) and gets all N features back.
  """
  mesh_lib.check_batch_divisible(batch_size, mesh)
  replicated = mesh_lib.replicated(mesh)
  extract = jax.jit(
      lambda v, x: model.apply(v, normalization_lib.normalize_images(x, **norm), train=False,
                               return_features=True),
      in_shardings=(replicated, mesh_lib.batch_sharded(mesh)), out_shardings=replicated)
  local = batch_size // jax.process_count()
  first = jax.process_index() * local
  chunks = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:],
                                              chunk.dtype)])
    rows = mesh_lib.global_batch(mesh, {"x": chunk[first:first + local]})["x"]
    chunks.append(np.asarray(jax.device_get(extract(variables, rows)))[:real])
  return np.concatenate(chunks)


@dataclasses.dataclass
class Run:
  """Everything one run needs, built once by ``setup``."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  norm: dict
  data: TrainData
  spec: dict
  model: object
  labels: dict
  state: dict
  manager: object
  schedule: object
  tx: object
  fingerprint: Optional[str]
  total_steps: int
  steps_per_epoch: float
  writer: metric_writers.MetricWriter
  eval_inputs: dict = dataclasses.field(default_factory=dict)  # split -> (source, dataset)

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state["step"]))

  @property
  def eval_every(self) -> int:
    """Steps between the validation scores logged while training; 0 = none."""
    config = self.config
    if not (config.eval.every_epochs and config.data.eval_split):
      return 0
    return max(1, round(config.eval.every_epochs * self.steps_per_epoch))

  def eval_input(self, split: str) -> tuple[pipeline.AnySource, tf.data.Dataset]:
    """``split``'s source and evaluation pipeline, built on first use, then reused.

    One pipeline per split for the whole run: TensorFlow keeps what it traces
    for every pipeline built (``pipeline.eval_dataset``).
    """
    if split not in self.eval_inputs:
      eval_source = source(self.config, split)
      self.eval_inputs[split] = (eval_source, pipeline.eval_dataset(
          eval_source, **eval_stream_options(self.config)))
    return self.eval_inputs[split]

  def dropout_rng(self) -> jax.Array:
    """The rng that every step folds its step number into (replicated)."""
    return jax.jit(lambda: jax.random.key(self.config.seed + 1),
                   out_shardings=mesh_lib.replicated(self.mesh))()


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Validates, loads data and backbone, builds the state; restores a checkpoint.

  All input checks run before the model is built or any data is decoded.
  """
  validate_config(config)
  prepare_workdir(workdir)
  check_resume_config(workdir, config)
  return setup_runs([config], [workdir])[0]


def setup_runs(configs, workdirs) -> list[Run]:
  """One ``Run`` per (config, workdir), sharing the data, the model and the parameters.

  What ``setup`` does after its checks, for configs that passed
  ``validate_config`` and workdirs that passed ``prepare_workdir`` and
  ``check_resume_config``. The configs may differ only in their optimizer
  settings (``fused.check_fusable``): the data, the model and the backbone
  come from ``configs[0]`` and are loaded once, and every run's state starts
  from the same parameter arrays (a restored checkpoint replaces only its
  trainable leaves).
  """
  config = configs[0]
  mesh = mesh_lib.make_data_mesh()
  mesh_lib.check_batch_divisible(config.optim.batch_size, mesh)
  micro_batch = config.optim.batch_size // config.optim.accumulation_steps
  if micro_batch % mesh.devices.size:
    raise ConfigError(
        f"micro-batch size {micro_batch} (optim.batch_size / optim.accumulation_steps) is "
        f"not divisible by the {mesh.devices.size} devices; use a batch size that is a "
        f"multiple of {config.optim.accumulation_steps * mesh.devices.size}")
  norm = normalization(config)
  data = load_train_data(config)
  spec = factory.model_spec(config)
  model = factory.build_model(spec, data.num_classes)
  side_checkpoint = config.sidetune.checkpoint  # validate_config: set only for sidetune
  from_files = None
  if config.model.init_checkpoint or side_checkpoint:
    # Everything but the method's fresh parameters comes from the backbone file.
    # It is read and checked against the model's shapes (no compute) first, so a
    # truncated or mismatched file fails before anything is compiled.
    from_files = factory.load_pretrained(
        factory.variable_shapes(model, config.model.image_size)["params"], spec,
        config.model.init_checkpoint, side_checkpoint)
  variables = factory.init_variables(model, config.model.image_size, config.seed,
                                     out_shardings=mesh_lib.replicated(mesh))
  host_params = jax.device_get(variables["params"])
  if from_files is not None:  # the fresh leaves (still shapes) take their init values
    host_params = jax.tree.map(
        lambda loaded, initial: initial if isinstance(loaded, jax.ShapeDtypeStruct) else loaded,
        from_files, host_params)
  fingerprint = (npz_lib.fingerprint(config.model.init_checkpoint)
                 if config.model.init_checkpoint else None)
  labels = freezing.label_params(host_params, factory.trainable_rules(config))
  params = mesh_lib.put_replicated(host_params, mesh)
  steps_per_epoch = len(data.labels) / config.optim.batch_size
  runs = []
  for setting, workdir in zip(configs, workdirs):
    optim = setting.optim
    schedule = optimizers.make_schedule(
        optimizers.scaled_learning_rate(optim.base_lr, optim.batch_size),
        warmup_epochs=optim.warmup_epochs, total_epochs=optim.epochs,
        steps_per_epoch=steps_per_epoch, unit=optim.schedule_unit)
    tx = optimizers.make_optimizer(
        labels, name=optim.name or registry.get_method(setting.method).optimizer,
        learning_rate=schedule, weight_decay=optim.weight_decay, momentum=optim.momentum)
    # Built eagerly: compiling tx.init would cost seconds and save nothing.
    state = mesh_lib.put_replicated({"step": np.zeros([], np.int32),
                                     "opt_state": tx.init(host_params)}, mesh)
    state["params"] = params
    if "batch_stats" in variables:  # BatchNorm running averages (MLP-k heads)
      state["batch_stats"] = variables["batch_stats"]
    manager = ckpt_lib.open_manager(os.path.join(workdir, "checkpoints"),
                                    keep=setting.checkpoint.keep,
                                    every_steps=setting.checkpoint.every_steps)
    restored = ckpt_lib.restore_latest(manager, state, labels)
    runs.append(Run(
        config=setting, workdir=workdir, mesh=mesh, norm=norm, data=data, spec=spec,
        model=model, labels=labels, state=restored or state, manager=manager,
        schedule=schedule, tx=tx, fingerprint=fingerprint,
        total_steps=math.ceil(optim.epochs * steps_per_epoch),
        steps_per_epoch=steps_per_epoch, writer=metric_writers.MetricWriter(workdir)))
  return runs


def _eval_step(run: Run):
  return jax.jit(steps_lib.make_eval_step(run.model, **run.norm),
                 in_shardings=(mesh_lib.replicated(run.mesh), mesh_lib.batch_sharded(run.mesh)),
                 out_shardings=mesh_lib.replicated(run.mesh))


def train(run: Run, on_step: Optional[Callable[[int, dict], None]] = None) -> None:
  """Trains from the run's current step to the end, checkpointing as configured.

  ``on_step(step, state)``, if given, runs after every step (monitoring, e.g.
  benchmarks/soak.py); ``state`` is donated to the next step, so read it there.
  """
  config, writer, mesh = run.config, run.writer, run.mesh
  start_step = run.step
  params = run.state["params"]
  writer.print(parameter_overview(params, run.labels, backbone_size(
      params, registry.get_method(config.method).fresh_patterns)))
  writer.print(f"{len(run.data.labels)} training images, {run.data.num_classes} classes, "
               f"batch {config.optim.batch_size}, {run.total_steps} steps "
               f"({config.optim.epochs} epochs) on {mesh.devices.size} device(s)"
               + (f"; resuming at step {start_step}" if start_step else ""))
  replicated = mesh_lib.replicated(mesh)
  train_step = jax.jit(
      steps_lib.make_train_step(run.model, run.labels, run.tx, run.schedule, **run.norm,
                                accumulation_steps=config.optim.accumulation_steps),
      donate_argnums=(0,), in_shardings=(replicated, mesh_lib.batch_sharded(mesh), replicated),
      out_shardings=(replicated, replicated))
  eval_step = _eval_step(run)
  rng = run.dropout_rng()
  progress = metric_writers.Progress(run.total_steps, run.steps_per_epoch,
                                     config.optim.batch_size, start_step)
  eval_every = run.eval_every
  pending = []  # device metrics, fetched only when needed (no per-step host sync)
  features = None
  if uses_cached_features(config, run.labels) and start_step < run.total_steps:
    began = time.perf_counter()
    features = compute_features(run.model, steps_lib.model_variables(run.state),
                                run.data.images, mesh, batch_size=config.eval.batch_size,
                                norm=run.norm)
    writer.print(f"head-only: training on cached backbone features {features.shape}, "
                 f"computed in {time.perf_counter() - began:.1f}s")
  train_batches = batches(run.data, config, start_step, features)
  state = run.state
  # Crash-test hooks (ckpt_lib.TEST_HOOK_ENV); both None outside tests.
  kill_in_step, pause_after = ckpt_lib.hook_step("step"), ckpt_lib.hook_step("pause")
  with PreemptionNotice() as notice:
    for step in range(start_step + 1, run.total_steps + 1):
      state, metrics = train_step(state, mesh_lib.global_batch(mesh, next(train_batches)), rng)
      if step == kill_in_step:
        _kill_inside_step(run)
      pending.append(metrics)
      preempted = notice.received or run.manager.reached_preemption(step)
      save_due = (preempted or step == run.total_steps
                  or ckpt_lib.save_due(run.manager, step))
      log_due = step % config.log_every_steps == 0 or step == run.total_steps
      if log_due or save_due:
        # Never checkpoint parameters produced by a non-finite loss.
        window = check_finite(jax.device_get(pending), step - len(pending) + 1, run)
        pending = []
        if log_due:
          mean_metrics = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
          writer.write(step, mean_metrics, prefix="train/")
          writer.print(progress.line(step, mean_metrics))
      if eval_every and step % eval_every == 0 and step < run.total_steps:
        val = evaluate(run, eval_step, steps_lib.model_variables(state), config.data.eval_split)
        writer.write(step, val, prefix="val/")
        writer.print(f"step {step}: val top-1 {val['top1']:.4f} ({val['count']} images)")
      if save_due:
        ckpt_lib.save(run.manager, state, run.labels)
      if preempted:
        run.manager.wait_until_finished()
        # Every process reports (not only process 0): on multi-host runs the
        # logs show that all hosts stopped at the same step.
        print(f"preempted: saved step {step} in {run.workdir}/checkpoints (process "
              f"{jax.process_index()}); rerun the same command to resume", flush=True)
        raise Preempted(step)
      if step == pause_after:
        _pause_for_test(run.workdir, step)
      if on_step is not None:
        on_step(step, state)
  run.manager.wait_until_finished()
  run.state = state


def _kill_inside_step(run: Run) -> None:
  """Crash-test hook: SIGKILL while a step computes, once earlier saves are complete."""
  run.manager.wait_until_finished()  # makes the last complete checkpoint known
  os.kill(os.getpid(), signal.SIGKILL)


def _pause_for_test(workdir: str, step: int) -> None:
  """Crash-test hook: waits at a step boundary while a test signals the process.

  Creates ``WORKDIR/test-paused-at-<step>.<process index>`` and returns when
  the test deletes it (or after 5 minutes).
  """
  marker = os.path.join(workdir, f"test-paused-at-{step}.{jax.process_index()}")
  with open(marker, "w") as f:
    f.write(str(os.getpid()))
  deadline = time.monotonic() + 300
  while os.path.exists(marker) and time.monotonic() < deadline:
    time.sleep(0.05)


def check_finite(window: list, first_step: int, run: Run) -> list:
  """Raises, naming the first bad step, if any fetched loss is NaN or infinite.

  ``window``: host metrics of the steps ``first_step``, ``first_step + 1``, ...
  """
  for offset, metrics in enumerate(window):
    if not math.isfinite(float(metrics["loss"])):
      run.manager.wait_until_finished()
      raise FloatingPointError(
          f"loss became {float(metrics['loss'])} at step {first_step + offset}; stopping. "
          f"The last good checkpoint (step {run.manager.latest_step()}) is kept in "
          f"{run.workdir}/checkpoints; lower optim.base_lr and rerun in a new workdir.")
  return window


def finish(run: Run) -> dict:
  """Evaluates val and test, exports the task and writes results.json."""
  config = run.config
  eval_step = _eval_step(run)
  variables = steps_lib.model_variables(run.state)
  return write_results(run, {name: evaluate(run, eval_step, variables, split)
                             for name, split in final_splits(config)})


def final_splits(config) -> list[tuple[str, str]]:
  """[("val", split), ("test", split)] of the splits a finished run is scored on."""
  return [(name, split) for name, split in (("val", config.data.eval_split),
                                            ("test", config.data.test_split)) if split]


def write_results(run: Run, scores: dict, log_prefix: str = "") -> dict:
  """Logs the run's ``scores`` ({"val": evaluate(...), ...}), exports the task
  (``config.export``) and writes results.json; returns what it wrote."""
  params = run.state["params"]
  results = {"method": run.config.method, "step": run.step,
             "trainable_params": freezing.count(freezing.split(params, run.labels)[0]),
             "total_params": freezing.count(trees.flatten(params)),
             "backbone_params": backbone_size(
                 params, registry.get_method(run.config.method).fresh_patterns)}
  for name, score in scores.items():
    results[name] = score
    run.writer.write(run.step, score, prefix=f"{name}/")
    run.writer.print(f"{log_prefix}{name} top-1 {score['top1']:.4f}, top-5 "
                     f"{score['top5']:.4f} ({score['count']} images)")
  if run.config.export:
    results["export"] = export(run)
  if jax.process_index() == 0:
    with tf.io.gfile.GFile(os.path.join(run.workdir, RESULTS_FILE), "w") as f:
      json.dump(results, f, indent=2)
  return results


def export(run: Run) -> Optional[str]:
  """Writes the task export of the run's current parameters (process 0)."""
  if jax.process_index() != 0:
    return None
  return task_export.export_task(
      os.path.join(run.workdir, "export"), run.state["params"], run.labels, spec=run.spec,
      num_classes=run.data.num_classes, class_names=run.data.class_names,
      normalization=run.norm, backbone_path=run.config.model.init_checkpoint or None,
      backbone_fingerprint=run.fingerprint, init_seed=run.config.seed,
      batch_stats=run.state.get("batch_stats"))


def close(run: Run) -> None:
  run.writer.close()
  run.manager.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) one training run; returns what it writes to results.json.

  Returns:
    {"test": {"top1", "top5", "loss", "count"}, "trainable_params", ...}.
  """
  run = setup(config, workdir)
  try:
    train(run)
    return finish(run)
  finally:
    close(run)


def from_checkpoint(config: ml_collections.ConfigDict, workdir: str, action: str):
  """Evaluates ("evaluate") or exports ("export") the workdir's latest checkpoint."""
  run = setup(config, workdir)
  try:
    if run.manager.latest_step() is None:
      raise ConfigError(f"{workdir} has no checkpoint to {action}; train first "
                        "(--mode train) or point --workdir at a trained run")
    if action == "export":
      return export(run)
    return finish(run)
  finally:
    close(run)
