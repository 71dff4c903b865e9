r"""VTAB-1k data from the task table: split strings, missing-data steps, preparing.

``vtab_tasks`` holds the 19 tasks; this module applies them to the data at
hand: ``resolve_split`` turns a VTAB split name into the TFDS split string,
following the prepared dataset's split sizes as the reference does (and warning
when they move a boundary); ``missing_data_message`` says how to get a task's
data; ``prepare`` downloads and builds it.

Command line::

  python -m vpt_jax.data.vtab list
  python -m vpt_jax.data.vtab prepare dmlab+eurosat --data_dir ~/tensorflow_datasets \
      [--manual_dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from typing import Mapping, Optional

from vpt_jax.data import vtab_tasks


def resolve_split(task: vtab_tasks.VtabTask, split: str,
                  sizes: Optional[Mapping[str, int]] = None) -> str:
  """A VTAB split name -> TFDS split string; anything else passes through.

  Args:
    task: the task.
    split: "train800", "val200", "train800val200", "test", or a TFDS split
      string (used as it is).
    sizes: the prepared dataset's TFDS split sizes. The reference computes the
      boundaries from them; None (or no "train" size) uses the literal strings.
  """
  if split not in vtab_tasks.SPLIT_NAMES:
    return split
  if not sizes or "train" not in sizes:
    return task.splits[split]
  computed = vtab_tasks.compute_splits(task, sizes)[split]
  if computed != task.splits[split]:
    # The reference would silently follow the sizes; say so, since the numbers
    # are then not comparable with published ones.
    print(f"warning: {task.builder} split sizes {dict(sizes)} differ from the "
          f"reference's {dict(task.reference_sizes)}: {split} is {computed!r}, not "
          f"{task.splits[split]!r} (following the sizes, as the reference does)",
          file=sys.stderr)
  return computed


def missing_data_message(task: vtab_tasks.VtabTask, data_dir: Optional[str]) -> str:
  """What to do when the task's TFDS dataset is not prepared in data_dir."""
  where = data_dir or "the TFDS default data_dir (~/tensorflow_datasets)"
  if task.manual_download:
    steps = task.manual_download.replace("DATA_DIR", data_dir or "~/tensorflow_datasets")
  else:
    steps = (f"Prepare it with: python -m vpt_jax.data.vtab prepare {task.name} "
             f"--data_dir {data_dir or '~/tensorflow_datasets'} (downloads "
             f"{task.download}), or `tfds build {task.builder}`")
  return (f"VTAB task {task.name!r} needs TFDS {task.builder}, which is not prepared in "
          f"{where}. {steps}. Or point --config.data.data_dir at a directory that "
          "holds it, or --config.data.path at the extracted VTAB-1k folder.")


def format_table() -> str:
  """A markdown table of the registry (for `python -m vpt_jax.data.vtab list`)."""
  lines = ["| task | group | TFDS builder | classes | train800 | val200 | test (size) | "
           "download |", "|---|---|---|---|---|---|---|---|"]
  for t in vtab_tasks.TASKS.values():
    download = "manual" if t.manual_download else t.download
    lines.append(f"| {t.name} | {t.group} | `{t.builder}` | {t.num_classes} | "
                 f"`{t.splits['train800']}` | `{t.splits['val200']}` | "
                 f"`{t.splits['test']}` ({t.test_size}) | {download} |")
  return "\n".join(lines)


def prepare(names: list[str], data_dir: Optional[str],
            manual_dir: Optional[str] = None) -> None:
  """Downloads and prepares the tasks' TFDS datasets (each builder once)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builders = list(dict.fromkeys(vtab_tasks.get_task(n).builder for n in names))
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  for builder_name in builders:
    print(f"preparing {builder_name} in {data_dir or 'the TFDS default data_dir'}",
          flush=True)
    tfds.builder(builder_name, data_dir=data_dir).download_and_prepare(
        download_config=config)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m vpt_jax.data.vtab",
                                   description="The VTAB-1k task registry.")
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("list", help="print every task's builder, splits and classes")
  prep = sub.add_parser("prepare", help="download and prepare tasks with TFDS")
  prep.add_argument("tasks", help='"all", a group, or task names joined by "+"')
  prep.add_argument("--data_dir", default=None)
  prep.add_argument("--manual_dir", default=None,
                    help="where the manually downloaded files are (resisc45, retinopathy)")
  args = parser.parse_args(argv)
  if args.command == "list":
    print(format_table())
  else:
    prepare(vtab_tasks.task_names(args.tasks), args.data_dir, args.manual_dir)


if __name__ == "__main__":
  main()
