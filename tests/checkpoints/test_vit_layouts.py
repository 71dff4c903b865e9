"""The official ViT .npz layouts: detection, conversion to model names, posemb resampling,
and the loaded big_vision model computing big_vision's function."""

from __future__ import annotations

import numpy as np
import pytest

import tolerances
import checkpoint_fixtures as fixtures
import numpy_vit
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import vit_layouts
from vpt_jax.methods import prompts
from vpt_jax.params.trees import flatten, unflatten

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
  loaded = flatten(fixtures.load_backbone(ckpt.init_params, ckpt.path))
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
  assert vit_layouts.detect_layout(npz.read_npz(path)) == "vit_linen"
  loaded = flatten(fixtures.load_backbone(ckpt.init_params, path))
  source, init = flatten(ckpt.source_params), flatten(ckpt.init_params)
  for key in init:
    np.testing.assert_array_equal(loaded[key], init[key] if _is_fresh(key) else source[key])


# --------------------------------------------------------------------------
# Layouts.


@pytest.mark.parametrize("layout,expected", [
    ("vit_raw", "vit_raw"), ("vit_raw_opt", "vit_raw"),
    ("big_vision", "big_vision"), ("big_vision_scan", "big_vision")])
def test_detect_layout(tmp_path, layout, expected):
  ckpt = fixtures.make_checkpoint(tmp_path, layout)
  assert vit_layouts.detect_layout(npz.read_npz(ckpt.path)) == expected


def test_detect_layout_linen_with_and_without_params_prefix(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  flat = {k: np.asarray(v) for k, v in flatten(ckpt.source_params).items()}
  assert vit_layouts.detect_layout(flat) == "vit_linen"
  assert vit_layouts.detect_layout({f"params/{k}": v for k, v in flat.items()}) == "vit_linen"


def test_detect_layout_unknown_names_what_it_saw():
  with pytest.raises(npz.UnknownLayoutError, match=r"conv1.*ViT checkpoint"):
    vit_layouts.detect_layout({"conv1/weight": np.zeros(3), "fc/bias": np.zeros(2)})


def test_raw_conversion_yields_exactly_the_backbone_keys(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw", **PROMPTED)
  converted = vit_layouts.to_model_layout(ckpt.arrays, "vit_raw")
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
  assert vit_layouts.detect_layout(flat) == "vit_raw"
  assert vit_layouts.to_model_layout(flat, "vit_raw") == {
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
  converted = vit_layouts.to_model_layout(ckpt.arrays, "big_vision")
  for layer in range(2):
    np.testing.assert_array_equal(
        converted[f"Transformer/encoderblock_{layer}/MlpBlock_0/Dense_0/kernel"],
        stacked[layer])
  assert not any(k.startswith("Transformer/encoderblock/") for k in converted)
  posemb = converted[vit_layouts.POSEMB_KEY]
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
  out = vit_layouts.resample_posemb(posemb, 1 + 16, has_class_token=True)
  assert out.shape == (1, 17, 2) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, :1], class_row)
  i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
  np.testing.assert_allclose(out[0, 1:, 0].reshape(4, 4), 2 * i + j, atol=1e-6)
  np.testing.assert_allclose(out[0, 1:, 1].reshape(4, 4), i * j, atol=1e-6)


def test_resample_posemb_class_token_cases():
  rng = np.random.default_rng(0)
  with_class = rng.standard_normal((1, 197, 8))
  out = vit_layouts.resample_posemb(with_class, 577, has_class_token=True)
  assert out.shape == (1, 577, 8)
  np.testing.assert_array_equal(out[:, 0], with_class[:, 0])
  assert vit_layouts.resample_posemb(with_class[:, 1:], 576,
                                     has_class_token=False).shape == (1, 576, 8)
  np.testing.assert_array_equal(vit_layouts.resample_posemb(with_class, 197, True), with_class)
  # The class-token flag is explicit: a wrong guess is an error, never a silent bug.
  with pytest.raises(npz.PositionEmbeddingError, match=r"197 patch tokens.*has_class_token"):
    vit_layouts.resample_posemb(with_class, 576, has_class_token=False)
  with pytest.raises(npz.PositionEmbeddingError, match=r"195 patch tokens"):
    vit_layouts.resample_posemb(with_class[:, 1:], 577, has_class_token=True)


def test_resample_posemb_rejects_non_square_target_and_bad_rank():
  with pytest.raises(npz.PositionEmbeddingError, match=r"model has 15 patch tokens"):
    vit_layouts.resample_posemb(np.zeros((1, 17, 4)), 16, has_class_token=True)
  with pytest.raises(npz.PositionEmbeddingError, match=r"\(1, tokens, D\)"):
    vit_layouts.resample_posemb(np.zeros((17, 4)), 5, has_class_token=True)



# --------------------------------------------------------------------------
# The loaded big_vision model computes big_vision's function.


@pytest.mark.numerics
def test_big_vision_weights_match_numpy_forward(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "big_vision", **PROMPTED,
                                  pool="img_pool", num_classes=4)
  loaded = fixtures.load_backbone(ckpt.init_params, ckpt.path)
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
