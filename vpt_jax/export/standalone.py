"""Writes task exports as models that serve without vpt_jax, in the format asked for.

The one entry point of training (``config.export.format``) and the command
line (``run.py --mode=export --tasks=...``) into ``stablehlo_export`` and
``saved_model_export``.
"""

from __future__ import annotations

from typing import Mapping, Optional

from vpt_jax.export import saved_model_export
from vpt_jax.export import stablehlo_export
from vpt_jax.export import task_export

_WRITERS = {"stablehlo": stablehlo_export.write_stablehlo,
            "saved_model": saved_model_export.write_saved_model}


def _check(export_format: str, batch_size: int, platforms: str) -> tuple[str, ...]:
  """``stablehlo_export.check_settings``, refusing "npz" too (it is not served alone)."""
  names = stablehlo_export.check_settings(export_format, batch_size, platforms)
  if export_format not in _WRITERS:
    raise task_export.ExportError(
        f"format {export_format!r} needs vpt_jax to serve; a standalone export is one of "
        f"{', '.join(_WRITERS)}")
  return names


def export_task(export_dir: str, directory: str, *, export_format: str,
                backbone_path: Optional[str] = None, batch_size: int = 0,
                platforms: str = stablehlo_export.DEFAULT_PLATFORMS) -> str:
  """One task export (backbone file + ``export_dir``) -> ``directory``; returns it.

  Raises:
    ExportError: bad settings (before anything is loaded) or a model that
      cannot be exported (see ``stablehlo_export.export_function``).
  """
  names = _check(export_format, batch_size, platforms)
  served = stablehlo_export.single_task_model(export_dir, backbone_path)
  return _WRITERS[export_format](served, directory, batch_size=batch_size, platforms=names)


def export_tasks(exports: Mapping[str, str], directory: str, *, export_format: str,
                 backbone_path: Optional[str] = None, batch_size: int = 0,
                 platforms: str = stablehlo_export.DEFAULT_PLATFORMS) -> str:
  """Task exports sharing a backbone ({name: export dir}) -> one stacked model in ``directory``.

  The served function takes each example's task as its position in ``exports``.
  Errors as ``export_task``, and those of ``serving.MultiTaskServer``.
  """
  names = _check(export_format, batch_size, platforms)
  served = stablehlo_export.stacked_tasks_model(exports, backbone_path)
  return _WRITERS[export_format](served, directory, batch_size=batch_size, platforms=names)
