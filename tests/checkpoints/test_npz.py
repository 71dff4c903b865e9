"""The .npz file: reading bad files, refusing pickles, fingerprints, atomic saving, gs:// paths."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile

import jax
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
from vpt_jax.checkpoints import npz
from vpt_jax.params.trees import flatten


# --------------------------------------------------------------------------
# Bad files.


def test_missing_file(tmp_path):
  path = str(tmp_path / "ViT-B_16.npz")
  with pytest.raises(npz.CheckpointNotFoundError) as error:
    npz.read_npz(path)
  assert path in str(error.value) and "gs://vit_models/imagenet21k/ViT-B_16.npz" in str(
      error.value)
  assert isinstance(error.value, FileNotFoundError)
  assert isinstance(error.value, npz.CheckpointError)
  with pytest.raises(npz.CheckpointNotFoundError, match="is a directory"):
    npz.read_npz(str(tmp_path))


def test_not_an_npz(tmp_path):
  path = tmp_path / "notes.npz"
  path.write_text("this is not a checkpoint\n")
  with pytest.raises(npz.CorruptCheckpointError, match=rf"{re.escape(str(path))} is not a "
                     r"valid \.npz checkpoint: it is not a zip archive"):
    npz.read_npz(str(path))
  single = tmp_path / "single.npz"
  with open(single, "wb") as f:
    np.save(f, np.zeros(3))
  with pytest.raises(npz.CorruptCheckpointError, match=r"single \.npy array"):
    npz.read_npz(str(single))
  torch_like = tmp_path / "model.pth"
  with zipfile.ZipFile(torch_like, "w") as archive:
    archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
  with pytest.raises(npz.CorruptCheckpointError, match="PyTorch"):
    npz.read_npz(str(torch_like))


def test_truncated_file(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  data = open(ckpt.path, "rb").read()
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(npz.CorruptCheckpointError,
                     match=rf"{re.escape(str(truncated))} is not a valid \.npz.*truncated"):
    npz.read_npz(str(truncated))


def test_damaged_member(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  data = bytearray(open(ckpt.path, "rb").read())
  # Flip bytes inside the largest member's array data (after its .npy header).
  with zipfile.ZipFile(ckpt.path) as archive:
    info = max(archive.infolist(), key=lambda i: i.file_size)
  start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 128
  data[start:start + 8] = bytes(b ^ 0xFF for b in data[start:start + 8])
  damaged = tmp_path / "damaged.npz"
  damaged.write_bytes(bytes(data))
  with pytest.raises(npz.CorruptCheckpointError, match=re.escape(info.filename[:-4])):
    npz.read_npz(str(damaged))


UNPICKLED = []


def _record_unpickling():
  UNPICKLED.append(True)
  return "payload"


class _Payload:
  """Unpickling this runs code; the loader must never get that far."""

  def __reduce__(self):
    return (_record_unpickling, ())


def test_pickled_object_arrays_are_refused(tmp_path):
  path = tmp_path / "pickled.npz"
  payload = np.empty(1, dtype=object)
  payload[0] = _Payload()
  with open(path, "wb") as f:
    np.savez(f, cls=np.zeros((1, 1, 4), np.float32), evil=payload)
  pickle.loads(pickle.dumps(_Payload()))  # sanity: the payload does run on unpickling
  assert UNPICKLED == [True]
  UNPICKLED.clear()
  with pytest.raises(npz.PickledCheckpointError, match=r"'evil' has dtype object"):
    npz.read_npz(str(path))
  assert not UNPICKLED


# --------------------------------------------------------------------------
# Fingerprint, saving, remote paths.


def test_fingerprint_is_sha256_of_bytes(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  assert npz.fingerprint(ckpt.path) == hashlib.sha256(
      open(ckpt.path, "rb").read()).hexdigest()
  with pytest.raises(npz.CheckpointNotFoundError):
    npz.fingerprint(str(tmp_path / "absent.npz"))


def test_fingerprint_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
  path = tmp_path / "weights.npz"
  path.write_bytes(b"first contents")
  assert npz.fingerprint(str(path)) == hashlib.sha256(b"first contents").hexdigest()
  reads = []
  monkeypatch.setattr(npz, "open", lambda *a: reads.append(a) or open(*a), raising=False)
  assert npz.fingerprint(str(path)) == hashlib.sha256(b"first contents").hexdigest()
  assert not reads  # the second call hashed nothing
  path.write_bytes(b"other contents")  # a rewrite: new size and modification time
  assert npz.fingerprint(str(path)) == hashlib.sha256(b"other contents").hexdigest()
  stat = os.stat(path)  # same size, only the modification time moves
  path.write_bytes(b"OTHER contents")
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
  assert npz.fingerprint(str(path)) == hashlib.sha256(b"OTHER contents").hexdigest()
  assert len(reads) == 2


def test_save_npz_round_trip_and_atomicity(tmp_path):
  tree = {"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)},
          "c": jax.numpy.ones((2,), jax.numpy.float16), "d": np.int32(3)}
  path = tmp_path / "out.npz"
  path.write_bytes(b"old contents")
  npz.save_npz(tree, str(path))
  assert sorted(os.listdir(tmp_path)) == ["out.npz"]  # no temporary left behind
  flat = npz.read_npz(str(path))
  assert sorted(flat) == ["a/b", "c", "d"]
  np.testing.assert_array_equal(flat["a/b"], tree["a"]["b"])
  assert flat["c"].dtype == np.float16
  with pytest.raises(ValueError, match=r"bfloat16 has no \.npy representation"):
    npz.save_npz({"w": jax.numpy.ones((2,), jax.numpy.bfloat16)}, str(tmp_path / "bf.npz"))
  npz.save_npz({"x/y": np.zeros(2)}, str(path))  # a flat dict works as well
  assert sorted(npz.read_npz(str(path))) == ["x/y"]
  with pytest.raises(ValueError, match="object arrays"):
    npz.save_npz({"bad": np.array([None], dtype=object)}, str(tmp_path / "bad.npz"))
  assert sorted(os.listdir(tmp_path)) == ["out.npz"]


def test_remote_paths_go_through_gfile(tmp_path):
  # file:// takes the same tf.io.gfile route as gs:// (which needs a network).
  pytest.importorskip("tensorflow")
  ckpt = fixtures.make_checkpoint(tmp_path, "big_vision")
  url = f"file://{ckpt.path}"
  assert sorted(npz.read_npz(url)) == sorted(ckpt.arrays)
  assert npz.fingerprint(url) == npz.fingerprint(ckpt.path)
  copy = f"file://{tmp_path}/copy.npz"
  npz.save_npz(npz.read_npz(url), copy)
  assert sorted(npz.read_npz(copy)) == sorted(ckpt.arrays)
  flat = flatten(fixtures.load_backbone(ckpt.init_params, url))
  np.testing.assert_array_equal(flat["cls"], ckpt.arrays["params/cls"])
  with pytest.raises(npz.CheckpointNotFoundError, match="absent.npz"):
    npz.read_npz(f"file://{tmp_path}/absent.npz")



def test_a_file_that_exists_but_cannot_be_read_is_not_reported_missing(tmp_path, monkeypatch):
  path = str(tmp_path / "ViT-B_16.npz")
  fixtures.write_tiny_backbone(path)
  real_open = open

  def no_permission(file, *args, **kwargs):  # what chmod 000 does to a non-root user
    if file == path:
      raise PermissionError(13, "Permission denied", file)
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr("builtins.open", no_permission)
  with pytest.raises(npz.CheckpointError, match=r"exists but cannot be read \(Permission "
                                                r"denied\); .*chmod") as error:
    npz.read_npz(path)
  assert not isinstance(error.value, FileNotFoundError)


def test_an_unreachable_remote_checkpoint_names_the_network_and_credentials(monkeypatch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def offline(path):  # what TensorFlow raises without network (seen with TF 2.21)
    raise tf.errors.FailedPreconditionError(
        None, None, "Error executing an HTTP request: libcurl code 6 meaning 'Could not "
        f"resolve hostname'\n\t when reading metadata of {path}")

  monkeypatch.setattr(tf.io.gfile, "exists", offline)
  with pytest.raises(npz.CheckpointError,
                     match=r"cannot reach gs://vit_models/x.npz \(Error executing an HTTP "
                           r"request.*\); check the network and credentials") as error:
    npz.read_npz("gs://vit_models/x.npz")
  assert "\n" not in str(error.value)
