"""Reading .safetensors files: every dtype against hand-written bytes, and malformed files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import torch_fixtures as tf
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import torch_files


def test_safetensors_round_trip_against_hand_written_bytes(tmp_path):
  path = tmp_path / "model.safetensors"
  f32 = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)
  f16 = struct.pack("<2e", 1.5, -0.125)
  bf16 = struct.pack("<3H", 0x3F80, 0xC020, 0x4040)  # 1.0, -2.5, 3.0
  i64 = struct.pack("<2q", -5, 2 ** 40)
  tf.write_safetensors([("module.a", "F32", (2, 2), f32), ("module.b", "F16", (2,), f16),
                        ("module.c", "BF16", (3,), bf16), ("module.d", "I64", (2,), i64)],
                       path, metadata={"format": "pt"})
  arrays = torch_files.read_state_dict(str(path))
  assert set(arrays) == {"a", "b", "c", "d"}  # the shared "module." prefix is removed
  np.testing.assert_array_equal(arrays["a"], [[1.0, -2.0], [0.5, 3.25]])
  assert arrays["a"].dtype == np.float32
  np.testing.assert_array_equal(arrays["b"], [1.5, -0.125])
  assert arrays["b"].dtype == np.float16
  np.testing.assert_array_equal(arrays["c"], [1.0, -2.5, 3.0])
  assert arrays["c"].dtype == np.float32
  np.testing.assert_array_equal(arrays["d"], [-5, 2 ** 40])
  assert arrays["d"].dtype == np.int64


def test_truncated_or_malformed_safetensors_are_refused(tmp_path):
  path = tmp_path / "model.safetensors"
  tf.write_safetensors([("w", "F32", (4,), struct.pack("<4f", 1, 2, 3, 4))], path)
  data = path.read_bytes()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(data[:-4])
  with pytest.raises(npz.CorruptCheckpointError, match="truncated"):
    torch_files.read_state_dict(str(cut))
  header_cut = tmp_path / "header_cut.safetensors"
  header_cut.write_bytes(data[:20])
  with pytest.raises(npz.CorruptCheckpointError, match="header length"):
    torch_files.read_state_dict(str(header_cut))
  wrong_size = tmp_path / "wrong.safetensors"
  tf.write_safetensors([("w", "F32", (3,), struct.pack("<4f", 1, 2, 3, 4))], wrong_size)
  with pytest.raises(npz.CorruptCheckpointError, match=r"spans 16 bytes, needs 12"):
    torch_files.read_state_dict(str(wrong_size))
  fp8 = tmp_path / "fp8.safetensors"
  tf.write_safetensors([("w", "F8_E4M3", (2,), b"\x01\x02")], fp8)
  with pytest.raises(npz.CorruptCheckpointError, match="F8_E4M3.*not supported"):
    torch_files.read_state_dict(str(fp8))

