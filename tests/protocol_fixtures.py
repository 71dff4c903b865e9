"""A protocol config with overrides, a stub run function and a small grid, shared by
the protocol tests; and a tiny real tuning grid (``run_tiny_protocol``) for the
sweep tests and their four-device check."""

import json
import os

import checkpoint_fixtures
from configs import vtab_protocol
from vpt_jax.protocol import run_plan
from vpt_jax.protocol import run_records
from vpt_jax.protocol import tuning


def protocol_config(arg="", **overrides):
  """configs/vtab_protocol.py with ``overrides`` ({"section.field": value}) set."""
  return checkpoint_fixtures.override(vtab_protocol.get_config(arg), overrides)


class StubRun:
  """Records calls; val top-1 from ``val`` {(lr, wd): score}, test from the seed."""

  def __init__(self, val=None, diverge_lr=None, fail_after=None):
    self.calls, self.val, self.diverge_lr, self.fail_after = [], val or {}, diverge_lr, fail_after

  def __call__(self, config, workdir):
    if self.fail_after is not None and len(self.calls) >= self.fail_after:
      raise KeyboardInterrupt("preempted")
    self.calls.append((config, workdir))
    lr, wd = config.optim.base_lr, config.optim.weight_decay
    if lr == self.diverge_lr:
      raise FloatingPointError("loss became nan at step 3")
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for step in range(1, 4):
        f.write(json.dumps({"step": step, "train/loss": 2.0 / step}) + "\n")
    results = {}
    if config.data.eval_split:
      results["val"] = {"top1": self.val.get((lr, wd), 0.5), "count": 200}
    if config.data.test_split:
      results["test"] = {"top1": 0.5 + config.seed / 10000, "count": 100}
    return results


# Two lrs, two weight decays, two seeds.
SMALL = dict(**{"protocol.lrs": (1.0, 0.5), "protocol.weight_decays": (1e-3, 0.0),
                "protocol.seeds": (42, 44)})


def fake_fingerprint(split, count=4, classes=(2, 2), **hashes):
  """A hand-made split fingerprint (data/fingerprints.py's fields) with named hashes."""
  fp = {"count": count, "classes": list(classes), "id_kind": "tfds", "image_size": 224,
        "resize": "tf1_bilinear", "preprocess": "resize", "split": split}
  fp.update({k: hashes.get(k, k) for k in ("pixels", "labelled", "ids", "examples", "order")})
  return fp


def write_finished_task(workdir, task, method, finals, costs=None):
  """A finished task's summary.json and final runs, written by hand.

  ``finals``: {seed: (test top-1, results["data"] or None, (logits, labels) or None)};
  ``costs``: {seed: results["cost"]}. Returns the method folder.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  folder = os.path.join(workdir, *task.split("/"), method)
  for seed, (top1, data, predicted) in finals.items():
    run_dir = os.path.join(folder, "final", f"seed{seed}")
    os.makedirs(run_dir)
    results = {"test": {"top1": top1}, **({"data": data} if data else {})}
    if costs and seed in costs:
      results["cost"] = costs[seed]
    with open(os.path.join(run_dir, "run.json"), "w") as f:
      json.dump({"status": "finished", "results": results}, f)
    if predicted is not None:
      np.savez(os.path.join(run_dir, "predictions_test.npz"),
               logits=np.asarray(predicted[0], np.float16),
               labels=np.asarray(predicted[1], np.int32))
  tops = [top1 for top1, _, _ in finals.values()]
  summary = {"task": task, "method": method, "base_method": method, "grid": [],
             "best": {"lr": 1.0, "weight_decay": 0.0, "val_top1": 0.5},
             "finals": [{"seed": s, "test_top1": t, "status": "finished"}
                        for s, (t, _, _) in finals.items()],
             "complete": True, "test_top1_mean": float(np.mean(tops)),
             "test_top1_std": float(np.std(tops)), "num_seeds": len(tops)}
  with open(os.path.join(folder, "summary.json"), "w") as f:
    json.dump(summary, f)
  return folder


TINY_TASK = "tfds:vpt_sprites/tiny"
TINY_GRID_WDS = (1e-2, 0.0)


def tiny_protocol(backbone, data_dir, **overrides):
  """A grid of VPT-deep (prompt dropout on) on 24 images, 6 steps, no final runs."""
  config = vtab_protocol.get_config(f"method=vpt_deep,tasks={TINY_TASK}")
  return checkpoint_fixtures.override(config, {
      "model.variant": "test/4", "model.image_size": 16, "model.init_checkpoint": backbone,
      "prompt.num_prompts": 2, "data.data_dir": data_dir, "data.label_key": "count",
      "optim.batch_size": 8, "optim.epochs": 2, "optim.warmup_epochs": 0,
      "eval.batch_size": 8, "log_every_steps": 2, "protocol.weight_decays": TINY_GRID_WDS,
      "protocol.seeds": (), "protocol.tune_train_split": "train",
      "protocol.tune_eval_split": "validation", "protocol.final_train_split": "train",
      "protocol.final_test_split": "test", **overrides})


def run_tiny_protocol(backbone, data_dir, workdir, fuse, lrs, **overrides):
  """Runs ``tiny_protocol`` over ``lrs`` x TINY_GRID_WDS with ``protocol.fuse_settings``
  = ``fuse``: {"config", "summary", "records": {(lr, wd): (run dir, run record)}}."""
  config = tiny_protocol(backbone, data_dir, **{"protocol.fuse_settings": fuse,
                                                "protocol.lrs": lrs, **overrides})
  summary, = tuning.run_protocol(config, workdir, write_report=False)
  records = {}
  for lr in lrs:
    for wd in TINY_GRID_WDS:
      spec = run_plan.RunSpec(TINY_TASK, "tune", lr, wd)
      run_dir = os.path.join(workdir, spec.folder("vpt_deep"))
      with open(os.path.join(run_dir, run_records.RUN_FILE)) as f:
        records[(lr, wd)] = (run_dir, json.load(f))
  return {"config": config, "summary": summary, "records": records}
