"""Reading PyTorch checkpoints (torch zip format, safetensors) without torch or pickle code."""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

import torch_fixtures as tf
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import torch_files


def _rng_array(shape, dtype=np.float32, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------
# torch zip format.


def test_bare_state_dict_with_strided_offset_and_half_tensors(tmp_path):
  weight = _rng_array((3, 4))
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


def test_training_checkpoints_are_unwrapped(tmp_path):
  blocks = _rng_array((2, 2))
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


def _payload_files(tmp_path):
  """(name, data.pkl bytes, marker) for pickles that would touch `marker` if run."""
  cases = []
  for module, name, make_args in [
      ("os", "system", lambda m: (f"touch {m}",)),
      ("posix", "system", lambda m: (f"touch {m}",)),
      ("builtins", "eval", lambda m: (f"open({str(m)!r}, 'w').close()",)),
      ("builtins", "exec", lambda m: (f"open({str(m)!r}, 'w').close()",)),
      ("subprocess", "call", lambda m: (["touch", str(m)],)),
  ]:
    marker = tmp_path / f"ran_{module}_{name}"
    state = {"weight": tf.tensor_of(np.ones(2, np.float32), "0"),
             "evil": tf.Reduce(module, name, make_args(marker))}
    cases.append((f"{module}.{name}", tf.pickle_bytes(state)[0], marker))
  return cases


def test_pickled_code_is_refused_and_never_runs(tmp_path):
  for global_name, payload, marker in _payload_files(tmp_path):
    path = tmp_path / "evil.pth"
    tf.write_torch_zip({"weight": tf.tensor_of(np.ones(2, np.float32), "0")}, path,
                       data_pkl=payload)
    with pytest.raises(torch_files.ForbiddenGlobalError) as info:
      torch_files.read_state_dict(str(path))
    assert info.value.global_name == global_name
    assert isinstance(info.value, npz.CheckpointError)
    message = str(info.value)
    assert global_name in message and "execute code" in message and "refused" in message
    assert not marker.exists(), f"{global_name} ran"
  # The payloads are live: plain pickle.loads runs one (written without tensors,
  # which would need torch to unpickle).
  marker = tmp_path / "ran_plain_pickle"
  pickle.loads(tf.pickle_bytes({"evil": tf.Reduce("os", "system", (f"touch {marker}",))})[0])
  assert marker.exists(), "the payload should run under plain pickle"


def test_numpy_reconstruction_and_model_classes_are_refused(tmp_path):
  payload = pickle.dumps({"w": np.ones(3, np.float32)}, protocol=2)  # numpy's own reduce
  path = tmp_path / "numpy_inside.pth"
  tf.write_torch_zip({}, path, data_pkl=payload)
  with pytest.raises(torch_files.ForbiddenGlobalError, match=r"numpy\.core\.multiarray\."
                     r"_reconstruct|numpy\._core\.multiarray\._reconstruct"):
    torch_files.read_state_dict(str(path))
  # A whole pickled model (torch.save(model)) needs its class.
  payload = tf.pickle_bytes({"m": tf.Reduce("timm.models.vision_transformer",
                                            "VisionTransformer", ())})[0]
  tf.write_torch_zip({}, path, data_pkl=payload)
  with pytest.raises(torch_files.ForbiddenGlobalError,
                     match=r"timm\.models\.vision_transformer\.VisionTransformer"):
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


def test_truncated_and_inconsistent_zip_files_are_refused(tmp_path):
  path = tmp_path / "full.pth"
  tf.write_torch_zip({"w": tf.tensor_of(_rng_array((64, 64)), "0")}, path)
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


# --------------------------------------------------------------------------
# safetensors.


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


# --------------------------------------------------------------------------
# Against real torch files (torch is not a dependency; skipped without it).


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
