"""Scores a finished ImageNet run on ImageNet's shifted test sets (domain generalisation).

The run's task export (``export/`` in the run folder) is rebuilt on its
backbone and applied to each target's TFDS split, read and preprocessed as the
run read its own test split (``data.preprocess``, ``data.resize``,
``model.image_size``). Per target the 1000-way logits (float16) and labels are
saved as ``predictions_<target>.npz`` beside the run's results, and scored two
ways (``data/imagenet_shifts.py``): ``top1`` (ImageNet-A/-R: the argmax among
their 200 classes, as OSU ViT_PEFT_Vision and Hendrycks et al.) and
``top1_1000way`` (the argmax over all 1000 classes, as NOAH).

Every process reads every target whole (process 0 writes the predictions): meant
for one host; a multi-host job repeats the scoring on each process.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from vpt_jax.data import eval_stream
from vpt_jax.data import imagenet_shifts
from vpt_jax.data import normalization
from vpt_jax.export import task_export
from vpt_jax.training import predictions


def target_logits(apply, variables, source, run_cfg) -> tuple[np.ndarray, np.ndarray]:
  """(logits float32 (N, C), labels int32 (N,)) of ``apply`` over a source, in stored order."""
  logits, labels = [], []
  for batch in eval_stream.eval_batches(
      source, image_size=run_cfg.model.image_size, local_batch=run_cfg.eval.batch_size,
      resize=run_cfg.data.resize, preprocess=run_cfg.data.preprocess):
    mask = batch["mask"]
    if mask.any():
      logits.append(np.asarray(apply(variables, batch["image"]), np.float32)[mask])
      labels.append(batch["label"][mask])
  return np.concatenate(logits), np.concatenate(labels)


def score_targets(run_cfg, run_dir: str, targets: list) -> dict:
  """{target name: {"top1", "top1_1000way", "count"}} of the run's export.

  Args:
    run_cfg: the run's config (data_dir, preprocessing, eval batch size).
    run_dir: the finished run's folder, holding ``export/``.
    targets: ``imagenet_shifts.ShiftTarget``s.
  """
  model, variables, metadata = task_export.load_task_variables(
      os.path.join(run_dir, "export"), run_cfg.model.init_checkpoint or None)
  mean, std = metadata["normalization"]["mean"], metadata["normalization"]["std"]
  apply = jax.jit(lambda v, x: model.apply(v, normalization.normalize_images(x, mean, std)))
  scores = {}
  for target in targets:
    source = imagenet_shifts.target_source(target, run_cfg.data.data_dir or None)
    logits, labels = target_logits(apply, variables, source, run_cfg)
    if jax.process_index() == 0:
      predictions.write(run_dir, target.name, {"logits": logits, "labels": labels})
    scores[target.name] = {
        "top1": imagenet_shifts.subset_top1(logits, labels, target.classes),
        "top1_1000way": imagenet_shifts.full_top1(logits, labels), "count": int(len(labels))}
    print(f"  {target.title}: top-1 {100 * scores[target.name]['top1']:.2f} "
          f"(1000-way {100 * scores[target.name]['top1_1000way']:.2f}), "
          f"{len(labels)} images", flush=True)
  return scores
