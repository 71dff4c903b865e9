"""A tiny training run on the sprites builder, shared by the training tests."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoint_fixtures
from configs import common
from vpt_jax import cli
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.training import inputs

# tiny_config overrides whose step 4 overflows the weights under a finite loss.
# 24 images, batch 8: 3 steps an epoch. One warmup epoch holds the lr at 0 for
# steps 1-3 (the weights stay the finite init, |theta| up to ~4.6); step 4 runs
# at lr 8e39 * 8 / 256 = 2.5e38 (finite in float32) with an L2 decay of 10, so
# the update of the largest weight, 2.5e38 * (g + 10 * 4.6) ~ 1e40, overflows
# float32 (3.4e38) while the step's loss, from the initial weights, is finite.
OVERFLOWS_AT_STEP_4 = {"optim.warmup_epochs": 1, "optim.base_lr": 8e39,
                       "optim.weight_decay": 10.0}


def run_on_emulated_devices(script: str, *args: str, count: int = 4, timeout: int = 600):
  """Runs tests/``script`` with ``args`` in a new Python whose JAX sees ``count`` CPU
  devices (the count must be set before JAX starts); returns the JSON of the
  last line it prints."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + f" --xla_force_host_platform_device_count={count}")
  out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), script), *args],
                       env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_config(backbone_path, data_dir, **overrides):
  """VPT-deep on test/4 at 32 px, vpt_sprites/tiny (count), 3 epochs of batch 8, locked."""
  config = common.base_config()
  config.model.variant = "test/4"
  config.model.image_size = 32
  config.model.init_checkpoint = backbone_path
  config.prompt.num_prompts = 2
  config.data.builder = "vpt_sprites/tiny"
  config.data.data_dir = data_dir
  config.data.label_key = "count"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.test_split = "test"
  config.optim.batch_size = 8
  config.optim.epochs = 3
  config.optim.warmup_epochs = 1
  config.optim.base_lr = 2.0
  config.eval.batch_size = 4  # 10 test images: the last batch is padded
  config.eval.costs = False  # a compile per run; tests/training/test_costs.py turns it on
  config.log_every_steps = 3
  config.checkpoint.every_steps = 3
  config.checkpoint.keep = 10
  return checkpoint_fixtures.override(config, overrides)


def run_py_config(config_spec: str, overrides: dict):
  """The locked config `run.py --config=<config_spec> --config.<key>=<value> ...` trains.

  Built in the test's process: a reference run here costs no subprocess start
  (~10 s of importing TensorFlow and JAX). ``config_spec`` is relative to the
  repository ("configs/vpt.py:method=vpt_deep,...").
  """
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = cli.load_config_file(os.path.join(repo, config_spec))
  return checkpoint_fixtures.override(config, overrides)


def trained_params(workdir):
  """(results.json, the export's flat parameters) of a finished run."""
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  _, flat = task_export.read_export(results["export"])
  return results, flat


def saved_steps(workdir):
  """The steps of a run's committed checkpoints, ascending."""
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def checkpoint_is_finite(workdir, step):
  """Whether every array orbax holds for ``step`` (trainable, optimizer state) is finite."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    restored = manager.restore(step)
  return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(restored))


def error_step(error) -> int:
  """The step a divergence error names ("... at step N; stopping ...")."""
  return int(re.search(r" at step (\d+);", str(error)).group(1))


def refuse(name):
  """A stand-in for ``name`` that fails the test if called: the bad input reached compute."""
  def refused(*args, **kwargs):
    raise AssertionError(f"{name} ran: the bad input was not caught before compute")
  return refused


@pytest.fixture()
def no_model_init(monkeypatch):
  """Fails the test if the model is initialised (the first compilation of a run)."""
  monkeypatch.setattr(factory, "init_variables", refuse("factory.init_variables"))


@pytest.fixture()
def no_compute(monkeypatch, no_model_init):
  """Fails the test if the training data is decoded or the model initialised."""
  monkeypatch.setattr(inputs, "load_train_data", refuse("inputs.load_train_data"))
