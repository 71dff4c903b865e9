r"""Data fingerprints: what a split really held, so runs can say whether their data agree.

The fingerprint of one split is computed from the images after the run's
decoding and resizing (``preprocessing.preprocessed_examples`` with
``crop=False``: for "resize_crop_flip" the whole shorter-side-resized image),
so two copies of a dataset that decode to other pixels (NOAH's JPEG export of
VTAB-1k against the TFDS tensors) differ, and two that decode alike agree:

=============  ===============================================================
``count``      examples read
``classes``    the class histogram: examples per label 0..K-1
``pixels``     sha256 of the sorted per-image pixel digests: the images as a set
``labelled``   sha256 of the sorted (pixel digest, label) pairs
``ids``        sha256 of the sorted example ids: TFDS ids ("dmlab-train.tfrecord-
               00003-of-00016__12"), or file paths relative to the files' common
               folder, or "#<position>" for sources with neither
``examples``   sha256 of the sorted (id, label, pixel digest) triples: the split
               in one hash
``order``      sha256 of the (pixel digest, label) sequence in stored order
=============  ===============================================================

plus how the pixels were made (``image_size``, ``resize``, ``preprocess``).
A pixel digest is blake2b-128 of the image's shape and uint8 bytes.
``differences`` says how two fingerprints differ: counts, labels, pixels, ids,
order (``compare`` in the report, ``data_checks`` in the protocol). The
sorted hashes make the comparison independent of the stored order, which the
``order`` hash checks on its own.

Command line (canonical fingerprints of prepared VTAB-1k tasks; needs their
TFDS data, ``python -m vpt_jax.data.vtab prepare``)::

  python -m vpt_jax.data.fingerprints vtab all --data_dir ~/tensorflow_datasets \
      --out vpt_jax/protocol/data_fingerprints.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vpt_jax.data import few_shot
from vpt_jax.data import files
from vpt_jax.data import preprocessing
from vpt_jax.data import source_protocols
from vpt_jax.data import sources
from vpt_jax.data import vtab_tasks

# How the canonical VTAB-1k fingerprints are made (the protocol's VTAB settings).
CANONICAL_IMAGE_SIZE = 224
CANONICAL_RESIZE = "tf1_bilinear"
_cache: dict[str, dict] = {}


def pixel_digest(image: np.ndarray) -> str:
  """blake2b-128 hex digest of an image's shape and uint8 bytes."""
  image = np.ascontiguousarray(image, np.uint8)
  h = hashlib.blake2b(digest_size=16)
  h.update(repr(image.shape).encode())
  h.update(image.tobytes())
  return h.hexdigest()


def _sha(items) -> str:
  h = hashlib.sha256()
  for item in items:
    h.update(item.encode())
    h.update(b"\n")
  return h.hexdigest()


def example_ids(source: source_protocols.AnySource) -> tuple[str, list[str]]:
  """(kind, ids) of the split's examples in stored order: "tfds", "path" or "position"."""
  if isinstance(source, files.FileSource):
    paths = [str(p) for p in source.paths]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    return "path", [os.path.relpath(p, root) for p in paths]
  if isinstance(source, (source_protocols.ImageSource, sources.TfdsTaskSource)):
    return "tfds", _tfds_ids(source.builder, source.split, source.data_dir,
                             getattr(source, "image_key", "image"))
  if isinstance(source, few_shot.TfdsShotSource):  # the drawn positions of the pool
    return "tfds", source.example_ids()
  return "position", [f"#{i}" for i in range(source_protocols.num_examples(source))]


def _tfds_ids(builder_name: str, split: str, data_dir, image_key: str) -> list[str]:
  """TFDS's example ids of a split in stored order (images not decoded)."""
  builder = tfds.builder(builder_name, data_dir=data_dir)
  decoders = ({image_key: tfds.decode.SkipDecoding()}
              if image_key in builder.info.features else None)
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(add_tfds_id=True))
  return [t.decode() for t in ds.map(lambda e: e["tfds_id"]).as_numpy_iterator()]


def _decoded(source: source_protocols.AnySource, image_size: int, resize: str,
             preprocess: str) -> Iterator[tuple[np.ndarray, int]]:
  """(image, label) of each example in stored order, decoded and resized as a run's
  training split is (``training_stream.load_train_set``)."""
  ds = preprocessing.preprocessed_examples(source, image_size=image_size, resize=resize,
                                           preprocess=preprocess, crop=False)
  for example in files.numpy_batches(ds.prefetch(tf.data.AUTOTUNE)):  # unreadable: UserError
    yield example["image"], example["label"]


def fingerprint(source: source_protocols.AnySource, *, image_size: int,
                resize: str = "tf1_bilinear", preprocess: str = "resize",
                num_classes: Optional[int] = None,
                decoded: Optional[tuple[Sequence[np.ndarray], np.ndarray]] = None) -> dict:
  """The fingerprint (module docstring) of one split, read whole by this process.

  Args:
    source: the split.
    image_size, resize, preprocess: how the run decodes and resizes it.
    num_classes: K for the histogram (default: the source's classes).
    decoded: the split's (images, labels) as ``training_stream.load_train_set``
      decodes them with these settings (a run's training split), if in memory:
      then the split is read only for its ids.
  """
  examples = (zip(*decoded) if decoded is not None
              else _decoded(source, image_size, resize, preprocess))
  digests, labels = [], []
  for image, label in examples:
    digests.append(pixel_digest(image))
    labels.append(int(label))
  id_kind, ids = example_ids(source)
  if len(ids) != len(digests):  # skipped unreadable files: ids by position then
    id_kind, ids = "position", [f"#{i}" for i in range(len(digests))]
  classes = num_classes or source_protocols.num_classes(source)
  histogram = np.bincount(np.asarray(labels, np.int64), minlength=classes) if labels else (
      np.zeros(classes, np.int64))
  return {
      "count": len(digests), "classes": histogram.tolist(), "id_kind": id_kind,
      "image_size": image_size, "resize": resize, "preprocess": preprocess,
      "pixels": _sha(sorted(digests)),
      "labelled": _sha(sorted(f"{d} {y}" for d, y in zip(digests, labels))),
      "ids": _sha(sorted(ids)),
      "examples": _sha(sorted(f"{i} {y} {d}" for i, y, d in zip(ids, labels, digests))),
      "order": _sha(f"{d} {y}" for d, y in zip(digests, labels)),
  }


def config_fingerprint(config, split: str,
                       decoded: Optional[tuple[Sequence[np.ndarray], np.ndarray]] = None) -> dict:
  """``fingerprint`` of ``config.data``'s ``split`` as the run reads it (cached per process).

  The cache key is every ``config.data`` field, the split and the image size,
  so the final runs of one task (seeds, methods) read the split once.
  ``decoded``: as ``fingerprint``'s (the run's training split, if this is it).
  """
  key = json.dumps([config.data.to_dict(), split, config.model.image_size], sort_keys=True,
                   default=str)
  if key not in _cache:
    source = sources.make_source(config.data, split)
    _cache[key] = fingerprint(source, image_size=config.model.image_size,
                              resize=config.data.resize, preprocess=config.data.preprocess,
                              num_classes=config.data.num_classes or None, decoded=decoded)
  return _cache[key]


def _histogram_text(a: list, b: list, limit: int = 4) -> str:
  longest = max(len(a), len(b))
  a, b = a + [0] * (longest - len(a)), b + [0] * (longest - len(b))
  moved = [f"class {k}: {x} vs {y}" for k, (x, y) in enumerate(zip(a, b)) if x != y]
  more = f", +{len(moved) - limit} more" if len(moved) > limit else ""
  return ", ".join(moved[:limit]) + more


def differences(ours: dict, other: dict) -> list[str]:
  """How two fingerprints differ, most telling first; [] when they agree.

  Each item starts with its kind: "preprocessing" (pixels made otherwise: only
  counts and labels compared), "counts", "labels" (same count, other class
  histogram or other labels on the same images), "pixels" (other images), "ids"
  (same labelled images under other names: re-encoded without loss, renamed,
  another format), "order" (same examples, stored in another order).
  """
  found = []
  made = ("image_size", "resize", "preprocess")
  same_pixels_basis = all(ours.get(k) == other.get(k) for k in made)
  if not same_pixels_basis:
    found.append("preprocessing: " + ", ".join(
        f"{k} {ours.get(k)} vs {other.get(k)}" for k in made if ours.get(k) != other.get(k)))
  histogram = (_histogram_text(ours["classes"], other["classes"])
               if ours["classes"] != other["classes"] else "")
  if ours["count"] != other["count"]:
    found.append(f"counts: {ours['count']} vs {other['count']} examples"
                 + (f" ({histogram})" if histogram else ""))
  elif histogram:
    found.append(f"labels: the class histogram differs ({histogram})")
  if not same_pixels_basis or ours["count"] != other["count"]:
    return found
  if ours["pixels"] != other["pixels"]:
    found.append("pixels: the decoded images differ")
  elif ours["labelled"] != other["labelled"]:
    if not any(f.startswith("labels") for f in found):
      found.append("labels: the same images carry other labels")
  elif ours["ids"] != other["ids"]:
    found.append(f"ids: the same labelled images under other ids ({ours.get('id_kind')} vs "
                 f"{other.get('id_kind')})")
  elif ours["order"] != other["order"]:
    found.append("order: the same examples in another stored order")
  return found


def vtab_fingerprints(names: list[str], data_dir: Optional[str],
                      image_size: int = CANONICAL_IMAGE_SIZE,
                      resize: str = CANONICAL_RESIZE) -> dict:
  """{"vtab/<task>": {split: fingerprint}} of prepared VTAB-1k tasks, every VTAB split."""
  out = {}
  for name in names:
    task = vtab_tasks.get_task(name)
    out[f"vtab/{task.name}"] = {
        split: fingerprint(sources.vtab_source(task.name, split, data_dir),
                           image_size=image_size, resize=resize,
                           num_classes=task.num_classes)
        for split in vtab_tasks.SPLIT_NAMES}
    print(f"fingerprinted vtab/{task.name}", flush=True)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m vpt_jax.data.fingerprints",
                                   description="Canonical data fingerprints.")
  sub = parser.add_subparsers(dest="command", required=True)
  vtab = sub.add_parser("vtab", help="fingerprint prepared VTAB-1k tasks (every split)")
  vtab.add_argument("tasks", help='"all", a group, or task names joined by "+"')
  vtab.add_argument("--data_dir", default=None)
  vtab.add_argument("--image_size", type=int, default=CANONICAL_IMAGE_SIZE)
  vtab.add_argument("--out", required=True,
                    help="JSON file to update (vpt_jax/protocol/data_fingerprints.json)")
  args = parser.parse_args(argv)
  found = vtab_fingerprints(vtab_tasks.task_names(args.tasks), args.data_dir,
                            args.image_size)
  table = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      table = json.load(f)
  table.setdefault("fingerprints", {}).update(found)
  versions = table.setdefault("tfds_versions", {})
  for name in found:
    versions[name] = vtab_tasks.get_task(name.split("/")[1]).builder
  with open(args.out, "w") as f:
    json.dump(table, f, indent=1, sort_keys=True)
  print(f"written: {args.out} ({len(found)} task(s))")


if __name__ == "__main__":
  main()
