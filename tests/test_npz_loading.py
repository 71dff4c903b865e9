"""Loading official ViT .npz checkpoints: layouts, resampling, strictness, bad files."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile

import jax
import numpy as np
import pytest

import tolerances
import checkpoint_fixtures as fixtures
import numpy_vit
from vpt_jax.checkpoints import npz
from vpt_jax.params.trees import flatten, unflatten
from vpt_jax.methods import prompts

PROMPTED = dict(hooks=prompts.VptOptions(3, deep=True))


def _is_fresh(key):
  return key.startswith(("head/", "vpt/"))


def _expected_backbone(source, layout):
  """What the loader must produce from a file written from `source` (model names)."""
  expected = {k: np.asarray(v) for k, v in flatten(source).items() if not _is_fresh(k)}
  if layout.startswith("big_vision"):
    # The file holds cls + posemb[0] and no class row; loading puts a zero row back.
    posemb = expected["Transformer/posembed_input/pos_embedding"].copy()
    expected["cls"] = expected["cls"] + posemb[:, :1]
    posemb[:, :1] = 0.0
    expected["Transformer/posembed_input/pos_embedding"] = posemb
  return expected


# --------------------------------------------------------------------------
# Loading really loads.


@pytest.mark.parametrize("layout", ["vit_raw", "vit_raw_opt", "big_vision",
                                    "big_vision_scan"])
def test_every_backbone_leaf_comes_from_the_file(tmp_path, layout):
  ckpt = fixtures.make_checkpoint(tmp_path, layout, **PROMPTED)
  loaded = flatten(npz.load_backbone(ckpt.init_params, ckpt.path))
  init = flatten(ckpt.init_params)
  expected = _expected_backbone(ckpt.source_params, layout)
  assert set(loaded) == set(init)
  assert set(expected) == {k for k in init if not _is_fresh(k)}
  for key, value in expected.items():
    assert not np.array_equal(init[key], value), f"{key}: fixture equals init"
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert loaded[key].dtype == init[key].dtype
  fresh = [k for k in init if _is_fresh(k)]
  assert any(k.startswith("vpt/") for k in fresh) and any(k.startswith("head/") for k in fresh)
  for key in fresh:  # prompts and head keep their fresh init (the file's head is zeros)
    np.testing.assert_array_equal(loaded[key], init[key], err_msg=key)


def test_linen_file_with_head_and_prompts_keeps_them_fresh(tmp_path):
  # Our own model writes Linen names, including vpt/ and head/: never read back.
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw", **PROMPTED)
  path = str(tmp_path / "linen.npz")
  npz.save_npz(ckpt.source_params, path)
  assert npz.detect_layout(npz.read_npz(path)) == "vit_linen"
  loaded = flatten(npz.load_backbone(ckpt.init_params, path))
  source, init = flatten(ckpt.source_params), flatten(ckpt.init_params)
  for key in init:
    np.testing.assert_array_equal(loaded[key], init[key] if _is_fresh(key) else source[key])


def test_variables_dict_and_custom_fresh(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  loaded = npz.load_backbone({"params": ckpt.init_params}, ckpt.path,
                             fresh=(r"head/.*", r"Transformer/encoder_norm/.*"))
  assert set(loaded) == {"params"}
  flat, init = flatten(loaded["params"]), flatten(ckpt.init_params)
  np.testing.assert_array_equal(flat["Transformer/encoder_norm/scale"],
                                init["Transformer/encoder_norm/scale"])
  np.testing.assert_array_equal(flat["cls"], ckpt.arrays["cls"])


def test_new_module_parameters_go_into_fresh(tmp_path):
  # The loader works on dicts: a future method's block-level parameters load
  # once the caller declares them fresh, and are reported missing otherwise.
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  tree = flatten(ckpt.init_params)
  adapter_key = "Transformer/encoderblock_1/adapter/down/kernel"
  tree[adapter_key] = np.full((16, 4), 0.5, np.float32)
  tree = unflatten(tree)
  with pytest.raises(npz.CheckpointMismatchError) as error:
    npz.load_backbone(tree, ckpt.path)
  assert error.value.missing == [adapter_key]
  assert "fresh=" in str(error.value)
  loaded = flatten(npz.load_backbone(
      tree, ckpt.path, fresh=npz.DEFAULT_FRESH + (r"Transformer/encoderblock_\d+/adapter/.*",)))
  np.testing.assert_array_equal(loaded[adapter_key], np.full((16, 4), 0.5))


# --------------------------------------------------------------------------
# Layouts.


@pytest.mark.parametrize("layout,expected", [
    ("vit_raw", "vit_raw"), ("vit_raw_opt", "vit_raw"),
    ("big_vision", "big_vision"), ("big_vision_scan", "big_vision")])
def test_detect_layout(tmp_path, layout, expected):
  ckpt = fixtures.make_checkpoint(tmp_path, layout)
  assert npz.detect_layout(npz.read_npz(ckpt.path)) == expected


def test_detect_layout_linen_with_and_without_params_prefix(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  flat = {k: np.asarray(v) for k, v in flatten(ckpt.source_params).items()}
  assert npz.detect_layout(flat) == "vit_linen"
  assert npz.detect_layout({f"params/{k}": v for k, v in flat.items()}) == "vit_linen"


def test_detect_layout_unknown_names_what_it_saw():
  with pytest.raises(npz.UnknownLayoutError, match=r"conv1.*ViT checkpoint"):
    npz.detect_layout({"conv1/weight": np.zeros(3), "fc/bias": np.zeros(2)})


def test_raw_conversion_yields_exactly_the_backbone_keys(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw", **PROMPTED)
  converted = npz.to_model_layout(ckpt.arrays, "vit_raw")
  backbone = {k for k in flatten(ckpt.init_params) if not _is_fresh(k)}
  assert set(converted) == backbone  # head/* and pre_logits/* dropped


def test_pre_linen_renumbering_is_generic():
  # One counter across types per parent (pre-Linen) -> one counter per type,
  # ordered numerically (10 after 2); explicit lower-case names untouched.
  flat = {
      "Transformer/encoderblock_0/Foo_0/Dense_2/kernel": 1,
      "Transformer/encoderblock_0/Foo_0/Dense_10/kernel": 2,
      "Transformer/encoderblock_0/Bar_1/x": 3,
      "Transformer/encoderblock_0/Foo_2/x": 4,
      "Transformer/encoderblock_0/Two_Words_3/x": 5,
      "Transformer/encoderblock_0/Bar_4/x": 6,
      "Transformer/encoderblock_0/custom_7/x": 7,
      "Transformer/posembed_input/pos_embedding": 8,
      "head/kernel": 9,
  }
  assert npz.detect_layout(flat) == "vit_raw"
  assert npz.to_model_layout(flat, "vit_raw") == {
      "Transformer/encoderblock_0/Foo_0/Dense_0/kernel": 1,
      "Transformer/encoderblock_0/Foo_0/Dense_1/kernel": 2,
      "Transformer/encoderblock_0/Bar_0/x": 3,
      "Transformer/encoderblock_0/Foo_1/x": 4,
      "Transformer/encoderblock_0/Two_Words_0/x": 5,
      "Transformer/encoderblock_0/Bar_1/x": 6,
      "Transformer/encoderblock_0/custom_7/x": 7,
      "Transformer/posembed_input/pos_embedding": 8,
  }


def test_big_vision_scanned_unstacks_the_depth_axis(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "big_vision_scan")
  stacked = ckpt.arrays["params/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"]
  assert stacked.shape == (2, 16, 32)
  converted = npz.to_model_layout(ckpt.arrays, "big_vision")
  for layer in range(2):
    np.testing.assert_array_equal(
        converted[f"Transformer/encoderblock_{layer}/MlpBlock_0/Dense_0/kernel"],
        stacked[layer])
  assert not any(k.startswith("Transformer/encoderblock/") for k in converted)
  posemb = converted[npz.POSEMB_KEY]
  assert posemb.shape == (1, 17, 16)
  np.testing.assert_array_equal(posemb[:, 0], 0.0)
  np.testing.assert_array_equal(posemb[:, 1:], ckpt.arrays["params/pos_embedding"])


# --------------------------------------------------------------------------
# Position-embedding resampling.


def test_resample_posemb_bilinear_by_hand():
  # 2x2 grid -> 4x4, corner-aligned: output (i, j) samples input (i/3, j/3).
  # Channel 0 is linear, f = 6r + 3c -> 2i + j; channel 1 is f = 9rc -> i*j.
  grid = np.array([[[0.0, 0.0], [3.0, 0.0]],
                   [[6.0, 0.0], [9.0, 9.0]]])
  class_row = np.array([[[-7.0, 11.0]]])
  posemb = np.concatenate([class_row, grid.reshape(1, 4, 2)], axis=1).astype(np.float32)
  out = npz.resample_posemb(posemb, 1 + 16, has_class_token=True)
  assert out.shape == (1, 17, 2) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, :1], class_row)
  i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
  np.testing.assert_allclose(out[0, 1:, 0].reshape(4, 4), 2 * i + j, atol=1e-6)
  np.testing.assert_allclose(out[0, 1:, 1].reshape(4, 4), i * j, atol=1e-6)


def test_resample_posemb_class_token_cases():
  rng = np.random.default_rng(0)
  with_class = rng.standard_normal((1, 197, 8))
  out = npz.resample_posemb(with_class, 577, has_class_token=True)
  assert out.shape == (1, 577, 8)
  np.testing.assert_array_equal(out[:, 0], with_class[:, 0])
  assert npz.resample_posemb(with_class[:, 1:], 576, has_class_token=False).shape == (1, 576, 8)
  np.testing.assert_array_equal(npz.resample_posemb(with_class, 197, True), with_class)
  # The class-token flag is explicit: a wrong guess is an error, never a silent bug.
  with pytest.raises(npz.PositionEmbeddingError, match=r"197 patch tokens.*has_class_token"):
    npz.resample_posemb(with_class, 576, has_class_token=False)
  with pytest.raises(npz.PositionEmbeddingError, match=r"195 patch tokens"):
    npz.resample_posemb(with_class[:, 1:], 577, has_class_token=True)


def test_resample_posemb_rejects_non_square_target_and_bad_rank():
  with pytest.raises(npz.PositionEmbeddingError, match=r"model has 15 patch tokens"):
    npz.resample_posemb(np.zeros((1, 17, 4)), 16, has_class_token=True)
  with pytest.raises(npz.PositionEmbeddingError, match=r"\(1, tokens, D\)"):
    npz.resample_posemb(np.zeros((17, 4)), 5, has_class_token=True)


@pytest.mark.parametrize("layout", ["vit_raw", "big_vision"])
def test_load_resamples_posemb_for_another_resolution(tmp_path, layout):
  ckpt = fixtures.make_checkpoint(tmp_path, layout)  # 16 px: 4x4 grid
  init = fixtures.make_model_params(ckpt.model, 32)  # 32 px: 8x8 grid
  loaded = flatten(npz.load_backbone(init, ckpt.path))
  file_posemb = npz.to_model_layout(ckpt.arrays, npz.detect_layout(ckpt.arrays))[
      npz.POSEMB_KEY]
  expected = npz.resample_posemb(file_posemb, 65, has_class_token=True)
  np.testing.assert_array_equal(loaded[npz.POSEMB_KEY], expected)
  if layout == "big_vision":
    np.testing.assert_array_equal(loaded[npz.POSEMB_KEY][:, 0], 0.0)


# --------------------------------------------------------------------------
# Strict mode.


def _rewrite(path, arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def test_missing_key_is_named_in_model_terms(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  arrays = dict(ckpt.arrays)
  del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
  _rewrite(ckpt.path, arrays)
  with pytest.raises(npz.CheckpointMismatchError) as error:
    npz.load_backbone(ckpt.init_params, ckpt.path)
  assert error.value.missing == ["Transformer/encoderblock_1/LayerNorm_1/scale"]
  assert "missing from the file (1):\n    Transformer/encoderblock_1/LayerNorm_1/scale" in str(
      error.value)


def test_unexpected_key(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  arrays = dict(ckpt.arrays, **{"Transformer/encoderblock_0/extra/kernel": np.zeros(3)})
  _rewrite(ckpt.path, arrays)
  with pytest.raises(npz.CheckpointMismatchError, match=r"in the file but not in the model "
                     r"\(1\):\n    Transformer/encoderblock_0/extra/kernel"):
    npz.load_backbone(ckpt.init_params, ckpt.path)
  loaded = npz.load_backbone(ckpt.init_params, ckpt.path,
                             ignore=(r"Transformer/encoderblock_0/extra/.*",))
  assert "extra" not in loaded["Transformer"]["encoderblock_0"]


def test_misshapen_key_lists_both_shapes(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  arrays = dict(ckpt.arrays)
  arrays["embedding/bias"] = np.zeros((17,), np.float32)
  _rewrite(ckpt.path, arrays)
  with pytest.raises(npz.CheckpointMismatchError) as error:
    npz.load_backbone(ckpt.init_params, ckpt.path)
  assert "embedding/bias: file (17,) vs model (16,)" in str(error.value)
  assert error.value.mismatched == [("embedding/bias", (17,), (16,))]


def test_all_problems_reported_at_once_sorted(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  arrays = dict(ckpt.arrays)
  del arrays["cls"]
  del arrays["Transformer/encoder_norm/bias"]
  arrays["zzz/extra"] = np.zeros(2)
  arrays["aaa/extra"] = np.zeros(2)
  arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias"] = np.zeros(5, np.float32)
  # A token count that is not a square grid cannot be resampled: a mismatch too.
  arrays["Transformer/posembed_input/pos_embedding"] = np.zeros((1, 16, 16), np.float32)
  _rewrite(ckpt.path, arrays)
  with pytest.raises(npz.CheckpointMismatchError) as error:
    npz.load_backbone(ckpt.init_params, ckpt.path)
  e = error.value
  assert e.missing == ["Transformer/encoder_norm/bias", "cls"]
  assert e.unexpected == ["aaa/extra", "zzz/extra"]
  assert [m[0] for m in e.mismatched] == [
      "Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias", npz.POSEMB_KEY]
  message = str(e)
  assert "(1, 16, 16) vs model (1, 17, 16) (cannot resample: 15 and 16" in message
  assert message.index("aaa/extra") < message.index("zzz/extra")
  assert message.rstrip().splitlines()[-1].startswith("Hint:")


def test_wrong_variant_hint(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")  # test/4: width 16, depth 2
  # Shapes are all the loader needs to diagnose a mismatch.
  bigger = fixtures.param_shapes(
      fixtures.vit.VisionTransformer(num_classes=5, variant="micro/4"), 16)
  with pytest.raises(npz.CheckpointMismatchError) as error:
    npz.load_backbone(bigger, ckpt.path)
  message = str(error.value)
  assert re.search(r"wrong variant\? The file implies width 16, patch 4x4, depth 2, "
                   r"heads 2, mlp_dim 32; the model has width 96, patch 4x4, depth 6", message)
  assert "Transformer/encoderblock_5/LayerNorm_0/scale" in error.value.missing


def test_fresh_keys_are_never_read_and_invalid_regex_is_reported(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  with pytest.raises(ValueError, match=r"invalid regex '\(' in fresh="):
    npz.load_backbone(ckpt.init_params, ckpt.path, fresh=("(",))


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
# Fingerprint, saving, trees.


def test_fingerprint_is_sha256_of_bytes(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  assert npz.fingerprint(ckpt.path) == hashlib.sha256(
      open(ckpt.path, "rb").read()).hexdigest()
  with pytest.raises(npz.CheckpointNotFoundError):
    npz.fingerprint(str(tmp_path / "absent.npz"))


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
  flat = flatten(npz.load_backbone(ckpt.init_params, url))
  np.testing.assert_array_equal(flat["cls"], ckpt.arrays["params/cls"])
  with pytest.raises(npz.CheckpointNotFoundError, match="absent.npz"):
    npz.read_npz(f"file://{tmp_path}/absent.npz")


def test_flatten_unflatten():
  tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
  assert flatten(tree) == {"a/b": 1, "a/c/d": 2, "e": 3}
  assert unflatten(flatten(tree)) == tree
  with pytest.raises(ValueError, match="both a leaf and"):
    unflatten({"a": 1, "a/b": 2})
  with pytest.raises(ValueError, match="without '/'"):
    flatten({"a/b": 1})


# --------------------------------------------------------------------------
# The loaded big_vision model computes big_vision's function.


@pytest.mark.numerics
def test_big_vision_weights_match_numpy_forward(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "big_vision", **PROMPTED,
                                  pool="img_pool", num_classes=4)
  loaded = npz.load_backbone(ckpt.init_params, ckpt.path)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  logits = np.asarray(ckpt.model.apply({"params": loaded}, images))

  # The reference runs the file's arrays with big_vision's own convention
  # (posemb (1, N, D) added to the patches, CLS without one), plus the same
  # fresh prompts and head.
  file_tree = {}
  for key, value in ckpt.arrays.items():
    name = key[len("params/"):]
    if name == "pos_embedding":
      name = "Transformer/posembed_input/pos_embedding"
    if not name.startswith("head/"):
      file_tree[name] = value
  reference_params = unflatten(dict(
      file_tree, **{k: v for k, v in flatten(ckpt.init_params).items() if _is_fresh(k)}))
  expected = numpy_vit.vit_forward(reference_params, images, pool_type="img_pool",
                                   posemb_has_class_row=False)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

  # And folding the CLS posemb row is exact: same function as the source weights.
  source = dict(flatten(ckpt.source_params))
  source.update({k: v for k, v in flatten(ckpt.init_params).items() if _is_fresh(k)})
  source_logits = np.asarray(ckpt.model.apply({"params": unflatten(source)}, images))
  # Two programs (CLS + its posemb row added before or after loading): sums at
  # most 1 + 3 + 16 tokens or 32 MLP units long, 2 blocks of 4 chained sums.
  atol = tolerances.rounding_atol(max(np.max(np.abs(source_logits)), 1.0),
                                  reduction_length=32, steps=2 * 4)
  np.testing.assert_allclose(logits, source_logits, rtol=0, atol=atol)
