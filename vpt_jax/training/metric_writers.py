"""Where metrics go: the console, a JSONL file and TensorBoard event files."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping, Optional

import jax


def format_duration(seconds: float) -> str:
  """12345 -> "3h25m45s"; 75 -> "1m15s"."""
  seconds = int(max(0, seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, console=sys.stdout, tensorboard: bool = True):
    self._enabled = jax.process_index() == 0
    self._console = console
    self._jsonl = None
    self._tb = None
    if not self._enabled:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from flax.metrics import tensorboard as flax_tb  # pylint: disable=g-import-not-at-top
      self._tb = flax_tb.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def print(self, text: str) -> None:
    if self._enabled and self._console is not None:
      print(text, file=self._console, flush=True)

  def write(self, step: int, scalars: Mapping[str, float], *, prefix: str = "") -> None:
    if not self._enabled:
      return
    record = {"step": int(step), **{f"{prefix}{k}": float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step":
          self._tb.scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Step, epoch, loss, lr, throughput and ETA on one console line."""

  def __init__(self, total_steps: int, steps_per_epoch: float, batch_size: int,
               start_step: int = 0):
    self.total_steps = total_steps
    self.steps_per_epoch = steps_per_epoch
    self.batch_size = batch_size
    self._last_time: Optional[float] = None
    self._last_step = start_step

  def line(self, step: int, metrics: Mapping[str, float]) -> str:
    now = time.perf_counter()
    rate = None
    if self._last_time is not None and step > self._last_step:
      rate = (step - self._last_step) / (now - self._last_time)
    self._last_time, self._last_step = now, step
    parts = [f"step {step}/{self.total_steps}",
             f"epoch {step / self.steps_per_epoch:.1f}",
             f"loss {metrics['loss']:.4f}",
             f"lr {metrics['learning_rate']:.4g}"]
    if rate:
      parts += [f"{rate * self.batch_size:.1f} img/s",
                f"ETA {format_duration((self.total_steps - step) / rate)}"]
    return " | ".join(parts)
