"""Saved predictions: per-example logits and labels of a run's test split.

With ``eval.save_predictions`` a finished run writes ``predictions_test.npz``
beside its results.json: "logits" float16 (N, C) and "labels" int32 (N,), one
row per example of the split in the order the evaluation read it (the stored
order on one host; on several hosts, global batches are the processes' local
batches side by side). Analyses (agreement between methods, per-class errors,
the report's paired bootstrap and per-class table) read them without a rerun.
"""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow as tf

FILE_PATTERN = "predictions_{split}.npz"


def keep_real_rows(chunks: list[dict]) -> dict:
  """Per-batch {"logits" (..., B, C), "label" (..., B), "mask" (..., B)} -> the real rows.

  A leading settings axis (a sweep's) is kept; every setting shares the batch's
  mask. Returns {"logits": float16 (..., N, C), "labels": int32 (..., N)}.
  """
  logits, labels = [], []
  for chunk in chunks:
    mask = np.asarray(chunk["mask"]).reshape(-1, np.shape(chunk["mask"])[-1])[0]
    logits.append(np.asarray(chunk["logits"])[..., mask, :].astype(np.float16))
    labels.append(np.asarray(chunk["label"])[..., mask].astype(np.int32))
  return {"logits": np.concatenate(logits, axis=-2), "labels": np.concatenate(labels, axis=-1)}


def write(workdir: str, split_name: str, predictions: dict) -> str:
  """Writes ``predictions`` ({"logits" (N, C), "labels" (N,)}); returns the file name."""
  name = FILE_PATTERN.format(split=split_name)
  buffer = io.BytesIO()  # zipfile seeks and reads back; GFile streams only
  np.savez(buffer, logits=np.asarray(predictions["logits"], np.float16),
           labels=np.asarray(predictions["labels"], np.int32))
  with tf.io.gfile.GFile(os.path.join(workdir, name), "wb") as f:
    f.write(buffer.getvalue())
  return name


def read(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(logits float16 (N, C), labels int32 (N,)) of a predictions file."""
  with tf.io.gfile.GFile(path, "rb") as f:
    buffer = io.BytesIO(f.read())
  with np.load(buffer) as data:
    return data["logits"], data["labels"]
