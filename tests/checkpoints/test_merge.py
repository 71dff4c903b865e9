"""Strictly merging checkpoint arrays into a model's parameters: fresh and ignored keys,
posemb resampling on load, and the readable diff of every mismatch."""

from __future__ import annotations

import re

import numpy as np
import pytest

import checkpoint_fixtures as fixtures
from vpt_jax.checkpoints import merge
from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import vit_layouts
from vpt_jax.params.trees import flatten, unflatten


# --------------------------------------------------------------------------
# Fresh parameters, posemb resampling on load.


def test_variables_dict_and_custom_fresh(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  loaded = fixtures.load_backbone({"params": ckpt.init_params}, ckpt.path,
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
    fixtures.load_backbone(tree, ckpt.path)
  assert error.value.missing == [adapter_key]
  assert "fresh=" in str(error.value)
  assert "--config.model.variant" in str(error.value)  # what a user of run.py can change
  loaded = flatten(fixtures.load_backbone(
      tree, ckpt.path, fresh=merge.DEFAULT_FRESH + (r"Transformer/encoderblock_\d+/adapter/.*",)))
  np.testing.assert_array_equal(loaded[adapter_key], np.full((16, 4), 0.5))


@pytest.mark.parametrize("layout", ["vit_raw", "big_vision"])
def test_load_resamples_posemb_for_another_resolution(tmp_path, layout):
  ckpt = fixtures.make_checkpoint(tmp_path, layout)  # 16 px: 4x4 grid
  init = fixtures.make_model_params(ckpt.model, 32)  # 32 px: 8x8 grid
  loaded = flatten(fixtures.load_backbone(init, ckpt.path))
  file_posemb = vit_layouts.to_model_layout(ckpt.arrays, vit_layouts.detect_layout(ckpt.arrays))[
      vit_layouts.POSEMB_KEY]
  expected = vit_layouts.resample_posemb(file_posemb, 65, has_class_token=True)
  np.testing.assert_array_equal(loaded[vit_layouts.POSEMB_KEY], expected)
  if layout == "big_vision":
    np.testing.assert_array_equal(loaded[vit_layouts.POSEMB_KEY][:, 0], 0.0)


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
    fixtures.load_backbone(ckpt.init_params, ckpt.path)
  assert error.value.missing == ["Transformer/encoderblock_1/LayerNorm_1/scale"]
  assert "missing from the file (1):\n    Transformer/encoderblock_1/LayerNorm_1/scale" in str(
      error.value)


def test_unexpected_key(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  arrays = dict(ckpt.arrays, **{"Transformer/encoderblock_0/extra/kernel": np.zeros(3)})
  _rewrite(ckpt.path, arrays)
  with pytest.raises(npz.CheckpointMismatchError, match=r"in the file but not in the model "
                     r"\(1\):\n    Transformer/encoderblock_0/extra/kernel"):
    fixtures.load_backbone(ckpt.init_params, ckpt.path)
  loaded = fixtures.load_backbone(ckpt.init_params, ckpt.path,
                                  ignore=(r"Transformer/encoderblock_0/extra/.*",))
  assert "extra" not in loaded["Transformer"]["encoderblock_0"]


def test_misshapen_key_lists_both_shapes(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  arrays = dict(ckpt.arrays)
  arrays["embedding/bias"] = np.zeros((17,), np.float32)
  _rewrite(ckpt.path, arrays)
  with pytest.raises(npz.CheckpointMismatchError) as error:
    fixtures.load_backbone(ckpt.init_params, ckpt.path)
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
    fixtures.load_backbone(ckpt.init_params, ckpt.path)
  e = error.value
  assert e.missing == ["Transformer/encoder_norm/bias", "cls"]
  assert e.unexpected == ["aaa/extra", "zzz/extra"]
  assert [m[0] for m in e.mismatched] == [
      "Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias", vit_layouts.POSEMB_KEY]
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
    fixtures.load_backbone(bigger, ckpt.path)
  message = str(error.value)
  assert re.search(r"wrong variant\? The file implies width 16, patch 4x4, depth 2, "
                   r"heads 2, mlp_dim 32; the model has width 96, patch 4x4, depth 6", message)
  assert "Transformer/encoderblock_5/LayerNorm_0/scale" in error.value.missing


def test_fresh_keys_are_never_read_and_invalid_regex_is_reported(tmp_path):
  ckpt = fixtures.make_checkpoint(tmp_path, "vit_raw")
  with pytest.raises(ValueError, match=r"invalid regex '\(' in fresh="):
    fixtures.load_backbone(ckpt.init_params, ckpt.path, fresh=("(",))

