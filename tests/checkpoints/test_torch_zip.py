"""The torch.save zip archive: storages, strides, offsets, half and bfloat16 tensors, and
truncated or inconsistent archives."""

from __future__ import annotations

import collections
import zipfile

import numpy as np
import pytest

import torch_fixtures as tf
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import torch_files


def test_bare_state_dict_with_strided_offset_and_half_tensors(tmp_path):
  weight = tf.rng_array((3, 4))
  # A transposed (non-contiguous) tensor: the (4, 3) transpose of `weight`
  # stored as weight's row-major storage with stride (1, 4).
  transposed = tf.Tensor(tf.Storage(weight, "1"), size=(4, 3), stride=(1, 4))
  # Two tensors sharing one storage: a (2,) slice at element offset 3.
  shared = tf.Storage(np.arange(6, dtype=np.float32), "2")
  half = np.array([[1.5, -2.25], [65504.0, 2 ** -24]], np.float16)
  state = collections.OrderedDict([
      ("fc.weight", tf.tensor_of(weight, "0")),
      ("fc.weight_t", transposed),
      ("whole", tf.Tensor(shared, (6,))),
      ("slice", tf.Tensor(shared, (2,), offset=3)),
      ("every_other", tf.Tensor(shared, (3,), stride=(2,))),
      ("half", tf.tensor_of(half, "3")),
      ("bn.num_batches_tracked", tf.tensor_of(np.array(7, np.int64), "4")),
      ("empty", tf.Tensor(tf.Storage(np.zeros(0, np.float32), "5"), (0, 3))),
  ])
  path = tmp_path / "resnet.pth"
  tf.write_torch_zip(state, path)
  arrays = torch_files.read_state_dict(str(path))
  assert list(arrays) == list(state)
  np.testing.assert_array_equal(arrays["fc.weight"], weight)
  np.testing.assert_array_equal(arrays["fc.weight_t"], weight.T)
  np.testing.assert_array_equal(arrays["whole"], np.arange(6))
  np.testing.assert_array_equal(arrays["slice"], [3.0, 4.0])
  np.testing.assert_array_equal(arrays["every_other"], [0.0, 2.0, 4.0])
  assert arrays["half"].dtype == np.float16
  np.testing.assert_array_equal(arrays["half"], half)
  assert arrays["bn.num_batches_tracked"].shape == () and arrays["bn.num_batches_tracked"] == 7
  assert arrays["bn.num_batches_tracked"].dtype == np.int64
  assert arrays["empty"].shape == (0, 3)


def test_bfloat16_storage_widens_exactly(tmp_path):
  # bfloat16 bit patterns: 1.0 = 0x3F80, -2.5 = 0xC020, 2^-10 = 0x3A80, 3.0 = 0x4040.
  bits = np.array([0x3F80, 0xC020, 0x3A80, 0x4040], np.uint16)
  state = {"w": tf.Tensor(tf.Storage(bits, "0", bfloat16_bits=True), (2, 2))}
  path = tmp_path / "bf16.pth"
  tf.write_torch_zip(state, path)
  w = torch_files.read_state_dict(str(path))["w"]
  assert w.dtype == np.float32
  np.testing.assert_array_equal(w, [[1.0, -2.5], [2.0 ** -10, 3.0]])


def test_truncated_and_inconsistent_zip_files_are_refused(tmp_path):
  path = tmp_path / "full.pth"
  tf.write_torch_zip({"w": tf.tensor_of(tf.rng_array((64, 64)), "0")}, path)
  data = path.read_bytes()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(npz.CorruptCheckpointError, match="truncated"):
    torch_files.read_state_dict(str(cut))
  # A tensor that claims more elements than its storage has (reading past the
  # buffer would expose other memory).
  overrun = tmp_path / "overrun.pth"
  storage = tf.Storage(np.zeros(4, np.float32), "0")
  tf.write_torch_zip({"w": tf.Tensor(storage, (2, 3))}, overrun)
  with pytest.raises(npz.CorruptCheckpointError, match="overruns its storage"):
    torch_files.read_state_dict(str(overrun))
  strided = tmp_path / "strided.pth"
  tf.write_torch_zip({"w": tf.Tensor(storage, (2, 2), stride=(1, 3))}, strided)
  with pytest.raises(npz.CorruptCheckpointError, match="reaches element 4"):
    torch_files.read_state_dict(str(strided))
  # A storage record shorter than its declared element count.
  short = tmp_path / "short.pth"
  with zipfile.ZipFile(overrun) as z:
    members = {n: z.read(n) for n in z.namelist()}
  with zipfile.ZipFile(short, "w") as z:
    for name, blob in members.items():
      z.writestr(name, blob[:8] if name.endswith("data/0") else blob)
  with pytest.raises(npz.CorruptCheckpointError, match="needs 16"):
    torch_files.read_state_dict(str(short))

