"""Building runs: data, model, backbone, optimizer and (restored) state, after the checks.

``setup_run(config, workdir)`` is what every entry point starts with: the
config checks (``config_checks``), then ``build_runs``. A sweep builds several
runs that share the data, the model and the frozen parameters.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax
import ml_collections
import tensorflow as tf

from vpt_jax.checkpoints import npz as npz_lib
from vpt_jax.checkpoints import train_state as ckpt_lib
from vpt_jax.data import eval_stream
from vpt_jax.data import source_protocols
from vpt_jax.methods import factory
from vpt_jax.methods import prompt_class_init
from vpt_jax.methods import registry
from vpt_jax.params import freezing
from vpt_jax.training import config_checks
from vpt_jax.training import head_init
from vpt_jax.training import inputs
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.training import metric_writers
from vpt_jax.training import optimizers
from vpt_jax.training import text_heads
from vpt_jax.training import workdir_lock


@dataclasses.dataclass
class Run:
  """Everything one run needs, built once by ``build_runs``."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  norm: dict
  data: inputs.TrainData
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
  lock: Optional[str] = None  # the workdir lock this process holds (workdir_lock)
  costs: dict = dataclasses.field(default_factory=dict)  # measured by the loop (costs.py)

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

  def eval_input(self, split: str) -> tuple[source_protocols.AnySource, tf.data.Dataset]:
    """``split``'s source and evaluation pipeline, built on first use, then reused.

    One pipeline per split for the whole run: TensorFlow keeps what it traces
    for every pipeline built (``eval_stream.eval_dataset``).
    """
    if split not in self.eval_inputs:
      eval_source = inputs.source(self.config, split)
      self.eval_inputs[split] = (eval_source, eval_stream.eval_dataset(
          eval_source, **inputs.eval_stream_options(self.config)))
    return self.eval_inputs[split]

  def dropout_rng(self) -> jax.Array:
    """The rng that every step folds its step number into (replicated)."""
    return jax.jit(lambda: jax.random.key(self.config.seed + 1),
                   out_shardings=mesh_lib.replicated(self.mesh))()


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Validates, loads data and backbone, builds the state; restores a checkpoint.

  All input checks run before the model is built or any data is decoded: the
  config's (``validate_config``), then the splits' sizes and classes (``check_data``).
  """
  config_checks.validate_config(config)
  config_checks.check_data(config)
  config_checks.prepare_workdir(workdir)
  return build_locked_runs([config], [workdir])[0]


def build_locked_runs(configs, workdirs) -> list[Run]:
  """Takes the workdirs' locks, checks each resume, then ``build_runs``.

  One run per workdir: a workdir another live run holds is refused before any
  compute (``workdir_lock``); the locks are released if anything here fails,
  else by ``close``.
  """
  locks = []
  try:
    for workdir in workdirs:  # process 0 holds them for a multi-host run
      locks.append(workdir_lock.acquire(workdir) if jax.process_index() == 0 else None)
    for config, workdir in zip(configs, workdirs):
      config_checks.check_resume_config(workdir, config)
    runs = build_runs(configs, workdirs)
  except BaseException:
    for path in locks:
      workdir_lock.release(path)
    raise
  return [dataclasses.replace(run, lock=lock) for run, lock in zip(runs, locks)]


def build_runs(configs, workdirs) -> list[Run]:
  """One ``Run`` per (config, workdir), sharing the data, the model and the parameters.

  What ``setup_run`` does after its checks, for configs that passed
  ``validate_config`` and workdirs that passed ``prepare_workdir`` and
  ``check_resume_config``. The configs may differ only in their optimizer
  settings (``sweeps.check_fusable``): the data, the model and the backbone
  come from ``configs[0]`` and are loaded once, and every run's state starts
  from the same parameter arrays (a restored checkpoint replaces only its
  trainable leaves).
  """
  config = configs[0]
  mesh = _data_mesh(config)
  norm = config_checks.normalization(config)
  data = inputs.load_train_data(config)
  spec = factory.model_spec(config)
  model = factory.build_model(spec, data.num_classes)
  variables, host_params = _parameters_with_head(config, spec, model, mesh, data)
  host_params = _class_token_prompts(config, spec, data, norm, host_params)
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
    state = mesh_lib.place_train_state(tx.init, params, host_params, mesh,
                                       shard_optimizer=optim.shard_state)
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


def _data_mesh(config) -> jax.sharding.Mesh:
  """The data-parallel mesh, refused if a (micro-)batch does not split over it."""
  mesh = mesh_lib.make_data_mesh()
  mesh_lib.check_batch_divisible(config.optim.batch_size, mesh)
  micro_batch = config.optim.batch_size // config.optim.accumulation_steps
  if micro_batch % mesh.devices.size:
    raise config_checks.ConfigError(
        f"micro-batch size {micro_batch} (optim.batch_size / optim.accumulation_steps) is "
        f"not divisible by the {mesh.devices.size} devices; use a batch size that is a "
        f"multiple of {config.optim.accumulation_steps * mesh.devices.size}")
  return mesh


def _parameters_with_head(config, spec: dict, model, mesh,
                          data: inputs.TrainData) -> tuple[dict, dict]:
  """``_initial_parameters`` with the head of ``head.init`` (if any) in the host params.

  The head's class embeddings are read and checked (and text encoded) before
  the model's parameters are initialised; ``head.init=text`` reading the
  backbone file shares the backbone's one read of it.
  """
  backbone_arrays = (factory.read_checkpoint_arrays(config.model.init_checkpoint)
                     if text_heads.reads_backbone_file(config) else None)
  head = config.head.init and head_init.initial_head(config, factory.variable_shapes(
      model, config.model.image_size)["params"], data.num_classes, data.class_names,
      backbone_arrays)
  variables, host_params = _initial_parameters(config, spec, model, mesh, backbone_arrays)
  return variables, head_init.set_head(host_params, head)


def _initial_parameters(config, spec: dict, model, mesh,
                        backbone_arrays: Optional[dict] = None) -> tuple[dict, dict]:
  """(initial variables on the mesh, host params with the backbone files' values).

  Everything but the method's fresh parameters comes from the backbone file
  (and the side network's, for sidetune); the fresh leaves keep their init.
  ``backbone_arrays``: the backbone file's ``read_checkpoint_arrays``, if read.
  """
  side_checkpoint = config.sidetune.checkpoint  # validate_config: set only for sidetune
  from_files = None
  if config.model.init_checkpoint or side_checkpoint:
    # The files are read and checked against the model's shapes (no compute)
    # first, so a truncated or mismatched file fails before anything is compiled.
    from_files = factory.load_pretrained(
        factory.variable_shapes(model, config.model.image_size)["params"], spec,
        config.model.init_checkpoint, side_checkpoint, backbone_arrays)
  # Only the fresh leaves are drawn (a backbone's random init would be thrown
  # away: 86M draws and 330 MB for ViT-B/16); their values are a full init's.
  fresh = None if from_files is None else jax.tree.map(
      lambda loaded: isinstance(loaded, jax.ShapeDtypeStruct), from_files)
  variables = factory.init_variables(model, config.model.image_size, config.seed,
                                     out_shardings=mesh_lib.replicated(mesh),
                                     keep_params=fresh)
  host_params = jax.device_get(variables["params"])
  if from_files is not None:  # the fresh leaves (still shapes) take their init values
    host_params = jax.tree.map(
        lambda loaded, initial: initial if isinstance(loaded, jax.ShapeDtypeStruct) else loaded,
        from_files, host_params, is_leaf=lambda leaf: leaf is None)
  return variables, host_params


def _class_token_prompts(config, spec: dict, data: inputs.TrainData, norm: dict,
                         host_params: dict) -> dict:
  """The prompts of ``prompt.init`` (VPT's class-token inits) from the loaded backbone."""
  try:
    return prompt_class_init.initialise(spec, host_params, data.images, data.labels,
                                        data.num_classes, norm, config.eval.batch_size)
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from e


def close(run: Run) -> None:
  """Closes the run's metric writer and checkpoint manager; releases its workdir."""
  run.writer.close()
  run.manager.close()
  workdir_lock.release(run.lock)
