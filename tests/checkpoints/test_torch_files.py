"""Reading PyTorch checkpoints by content: training checkpoints unwrapped, legacy pickles and
foreign files refused, real torch.save files (when torch is installed)."""

from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest

import torch_fixtures as tf
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import torch_files


def test_training_checkpoints_are_unwrapped(tmp_path):
  blocks = tf.rng_array((2, 2))
  # MoCo v3 (main_lincls.py): {"epoch", "arch", "state_dict", "best_acc1",
  # "optimizer"}, DistributedDataParallel's "module." on every key.
  moco = {
      "epoch": 100, "arch": "vit_base",
      "state_dict": collections.OrderedDict([
          ("module.blocks.0.attn.qkv.weight", tf.tensor_of(blocks, "0")),
          ("module.head.bias", tf.tensor_of(np.ones(2, np.float32), "1"))]),
      "best_acc1": tf.tensor_of(np.array(76.7, np.float32), "2"),
      "optimizer": {"state": {0: {"momentum_buffer": tf.tensor_of(np.zeros(2, np.float32),
                                                                  "3")}},
                    "param_groups": [{"lr": 0.1, "params": [0, 1], "nesterov": False}]},
  }
  path = tmp_path / "linear-vit-b-300ep.pth.tar"
  tf.write_torch_zip(moco, path, archive="linear-vit-b-300ep")  # torch 1.x: file stem
  arrays = torch_files.read_state_dict(str(path))
  assert set(arrays) == {"blocks.0.attn.qkv.weight", "head.bias"}
  np.testing.assert_array_equal(arrays["blocks.0.attn.qkv.weight"], blocks)
  # MAE / Swin / ConvNeXt: {"model": state_dict}; "model" wins over "state_dict".
  mae = {"model": {"cls_token": tf.tensor_of(np.full((1, 1, 2), 3.0, np.float32), "0")},
         "state_dict": {"other": tf.tensor_of(np.zeros(1, np.float32), "1")}}
  path = tmp_path / "mae_pretrain_vit_base.pth"
  tf.write_torch_zip(mae, path)
  arrays = torch_files.read_state_dict(str(path))
  assert list(arrays) == ["cls_token"] and arrays["cls_token"][0, 0, 1] == 3.0


def test_a_file_without_a_state_dict_names_its_keys(tmp_path):
  path = tmp_path / "meta.pth"
  tf.write_torch_zip({"epoch": 3, "config": {"lr": 0.1}}, path)
  with pytest.raises(npz.CheckpointError, match=r"no state dict.*'config', 'epoch'"):
    torch_files.read_state_dict(str(path))

def test_legacy_pickle_and_foreign_files_are_refused(tmp_path):
  legacy = tmp_path / "old.pth"
  # torch < 1.6: a bare protocol-2 pickle stream (starts with the magic number).
  legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
  with pytest.raises(npz.PickledCheckpointError, match=r"legacy.*re-save|Re-save"):
    torch_files.read_state_dict(str(legacy))
  text = tmp_path / "notes.pth"
  text.write_text("hello world, not a checkpoint")
  with pytest.raises(npz.CorruptCheckpointError, match="not a PyTorch checkpoint"):
    torch_files.read_state_dict(str(text))
  npz_file = tmp_path / "weights.pth"
  npz.save_npz({"a": np.ones(2, np.float32)}, str(npz_file))
  with pytest.raises(npz.CorruptCheckpointError, match="NumPy .npz"):
    torch_files.read_state_dict(str(npz_file))
  with pytest.raises(npz.CheckpointNotFoundError, match="does not exist"):
    torch_files.read_state_dict(str(tmp_path / "missing.pth"))
  with pytest.raises(npz.CheckpointNotFoundError):
    torch_files.read_state_dict(str(tmp_path))


# --------------------------------------------------------------------------
# Against real torch files. torch is not a dependency (requirements.txt), so the
# files torch.save wrote are checked in: tests/checkpoints/real_torch/real.pth.tar
# was written by torch 2.13.0 (CPU) with exactly the state of the test below, and
# expected.npz holds torch's own values of it (``tensor.numpy()``; bfloat16 as
# float32). The test below writes and reads the same file live where torch is
# installed.
REAL_TORCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "real_torch")


def test_a_file_written_by_torch_2_13_reads_as_torch_saw_it():
  arrays = torch_files.read_state_dict(os.path.join(REAL_TORCH, "real.pth.tar"))
  with np.load(os.path.join(REAL_TORCH, "expected.npz"), allow_pickle=False) as expected:
    assert sorted(arrays) == sorted(expected.files)  # "module." stripped, "epoch" dropped
    for key in expected.files:
      np.testing.assert_array_equal(arrays[key], expected[key], err_msg=key)
      assert arrays[key].dtype == expected[key].dtype, key
  np.testing.assert_array_equal(arrays["w_t"], arrays["w"].T)  # a strided view of w


def test_real_torch_save_files_match():
  torch = pytest.importorskip("torch")
  import tempfile  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(0)
  weight = torch.randn(5, 3, generator=generator)
  state = collections.OrderedDict([
      ("w", weight), ("w_t", weight.t()), ("half", weight.half()),
      ("bf16", weight.bfloat16()), ("steps", torch.tensor(3)),
      ("param", torch.nn.Parameter(weight[1:3]))])
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "real.pth.tar")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 1},
               path)
    arrays = torch_files.read_state_dict(path)
  for key, value in state.items():
    expected = value.detach().float().numpy() if key == "bf16" else value.detach().numpy()
    np.testing.assert_array_equal(arrays[key], expected, err_msg=key)
    assert arrays[key].dtype == expected.dtype, key
