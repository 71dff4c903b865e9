"""Data fingerprints on the local TFDS builders (digits, sprites) and on image folders
with one image changed, relabelled, re-encoded, missing or reordered."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_fixtures
from vpt_jax import errors
from vpt_jax.data import fingerprints
from vpt_jax.data import source_protocols
from vpt_jax.data import sources


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  return data_fixtures.prepared_tfds_dir(tmp_path_factory, ("vpt_sprites/tiny", "vpt_digits"))


def _sha_lines(lines):
  return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def _blake(image):
  h = hashlib.blake2b(digest_size=16)
  h.update(repr(image.shape).encode())
  h.update(np.ascontiguousarray(image).tobytes())
  return h.hexdigest()


def test_digits_fingerprint_matches_numpy(prepared):
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  images = np.repeat(np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None], 3, -1)
  images, labels = images[order][1000:], digits.target[order][1000:]
  source = source_protocols.ImageSource("vpt_digits", "test", prepared)
  got = fingerprints.fingerprint(source, image_size=8)  # 8 x 8: stored pixels, unresized
  assert got["count"] == 797
  assert got["classes"] == np.bincount(labels, minlength=10).tolist()
  digests = [_blake(image) for image in images]
  assert got["pixels"] == _sha_lines(sorted(digests))
  assert got["labelled"] == _sha_lines(sorted(f"{d} {y}" for d, y in zip(digests, labels)))
  # The order hash follows TFDS's stored order (TFDS shuffles the generator's).
  stored = tfds.as_numpy(tfds.builder("vpt_digits", data_dir=prepared).as_dataset(
      split="test", shuffle_files=False))
  assert got["order"] == _sha_lines(f"{_blake(e['image'])} {e['label']}" for e in stored)
  assert got["id_kind"] == "tfds"


def test_decoded_images_are_fingerprinted_without_decoding_the_split(prepared, monkeypatch):
  # A run's training split already in memory (here TFDS's stored 8 x 8 images,
  # unresized): only the ids are read, and the fingerprint is the decoded one's.
  source = source_protocols.ImageSource("vpt_digits", "test", prepared)
  expected = fingerprints.fingerprint(source, image_size=8)
  stored = list(tfds.as_numpy(tfds.builder("vpt_digits", data_dir=prepared).as_dataset(
      split="test", shuffle_files=False)))
  decoded = ([e["image"] for e in stored], np.asarray([e["label"] for e in stored]))
  monkeypatch.setattr(fingerprints.preprocessing, "preprocessed_examples", None)
  assert fingerprints.fingerprint(source, image_size=8, decoded=decoded) == expected


def test_sprites_splits_differ_and_repeat(prepared):
  data = data_fixtures.data_config(builder="vpt_sprites/tiny", data_dir=prepared,
                                   label_key="count")
  def fp(split, size=16):
    return fingerprints.fingerprint(sources.make_source(data, split), image_size=size)
  train = fp("train")
  assert train == fp("train")  # deterministic
  assert train["count"] == 24 and sum(train["classes"]) == 24 and len(train["classes"]) == 3
  assert fingerprints.differences(train, fp("train")) == []
  test = fp("test")
  assert [d.split(":")[0] for d in fingerprints.differences(train, test)] == ["counts"]
  same_count = fp("train[:10]")
  kinds = [d.split(":")[0] for d in fingerprints.differences(same_count, test)]
  assert "pixels" in kinds and "counts" not in kinds
  assert [d.split(":")[0] for d in fingerprints.differences(fp("train", 8), train)] == [
      "preprocessing"]


# ----------------------------------------------------------------- image folders

def _noise(seed):
  return np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/<class>/<i>.png: 3 noise images in each of classes a and b."""
  root = str(tmp_path_factory.mktemp("folder") / "base")
  for i in range(6):
    path = os.path.join(root, "ab"[i % 2], f"{i}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(_noise(i)).save(path)
  return root


def _folder_fp(root):
  source = sources.make_source(data_fixtures.data_config(task="folder", path=root), "all")
  return fingerprints.fingerprint(source, image_size=12)


def _variant(folder, tmp_path, change):
  root = str(tmp_path / "variant")
  shutil.copytree(folder, root)
  change(root)
  return [d.split(":")[0] for d in fingerprints.differences(_folder_fp(root),
                                                            _folder_fp(folder))]


def _reencode(root, fmt, ext, **options):
  png = os.path.join(root, "a", "0.png")
  Image.open(png).convert("RGB").save(png[:-4] + ext, fmt, **options)
  os.remove(png)


def test_identical_copy_agrees(folder, tmp_path):
  assert _variant(folder, tmp_path, lambda root: None) == []


def test_changed_image_differs_in_pixels(folder, tmp_path):
  change = lambda root: Image.fromarray(_noise(99)).save(os.path.join(root, "b", "1.png"))
  assert _variant(folder, tmp_path, change) == ["pixels"]


def test_relabelled_image_differs_in_labels(folder, tmp_path):
  move = lambda root: shutil.move(os.path.join(root, "a", "0.png"),
                                  os.path.join(root, "b", "0.png"))
  assert _variant(folder, tmp_path, move) == ["labels"]


def test_lossy_reencoding_differs_in_pixels(folder, tmp_path):
  jpeg = lambda root: _reencode(root, "JPEG", ".jpg", quality=75)
  assert _variant(folder, tmp_path, jpeg) == ["pixels"]


def test_lossless_reencoding_differs_only_in_ids(folder, tmp_path):
  bmp = lambda root: _reencode(root, "BMP", ".bmp")
  assert _variant(folder, tmp_path, bmp) == ["ids"]


def test_missing_image_differs_in_counts(folder, tmp_path):
  remove = lambda root: os.remove(os.path.join(root, "b", "3.png"))
  assert _variant(folder, tmp_path, remove) == ["counts"]


def test_reordered_list_differs_only_in_order(folder, tmp_path):
  lines = [f"{c}/{i}.png {'ab'.index(c)}" for i, c in zip(range(6), "ababab")]
  for name, rows in (("test", lines), ("swapped", lines[1:] + lines[:1])):
    with open(os.path.join(folder, f"{name}.txt"), "w") as f:
      f.write("\n".join(rows))
  data = data_fixtures.data_config(task="list", path=folder, num_classes=2)
  fp = lambda split: fingerprints.fingerprint(sources.make_source(data, split), image_size=12)
  assert [d.split(":")[0] for d in fingerprints.differences(fp("swapped"), fp("test"))] == [
      "order"]


def test_vtab_command_writes_every_split_of_a_task(tmp_path):
  """`python -m vpt_jax.data.fingerprints vtab` on TFDS mock data (no download)."""
  from vpt_jax.data import vtab_tasks  # pylint: disable=g-import-not-at-top
  task = vtab_tasks.get_task("dtd")
  data_dir, out = str(tmp_path / "tfds"), str(tmp_path / "canonical.json")
  data_fixtures.inject_split_sizes(data_dir, task.builder, task.reference_sizes)
  with tfds.testing.mock_data(num_examples=3, data_dir=data_dir):
    fingerprints.main(["vtab", "dtd", "--data_dir", data_dir, "--image_size", "8",
                       "--out", out])
  with open(out) as f:
    table = json.load(f)
  assert table["tfds_versions"] == {"vtab/dtd": task.builder}
  found = table["fingerprints"]["vtab/dtd"]
  assert sorted(found) == sorted(vtab_tasks.SPLIT_NAMES)
  for split in vtab_tasks.SPLIT_NAMES:  # the mock yields 3 examples per read
    assert found[split]["count"] == 3 and len(found[split]["classes"]) == 47
    assert found[split]["image_size"] == 8


def test_an_unreadable_image_is_a_one_line_user_error(folder, tmp_path):
  # --mode fingerprint may be the first read of a folder: its broken file is
  # named in one line, as in training, not in TensorFlow's node dump.
  root = str(tmp_path / "broken")
  shutil.copytree(folder, root)
  with open(os.path.join(root, "a", "broken.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 not a jpeg")
  with pytest.raises(errors.UserError, match=r"^cannot read or decode image \S*broken.jpg") as e:
    _folder_fp(root)
  assert "\n" not in str(e.value)
