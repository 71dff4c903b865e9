"""Convpass (methods/convpass.py) against a NumPy float64 reference of PETL-ViT's code."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import adapter_fixtures
import checkpoint_fixtures as fixtures
import numpy_adapters as ref
import numpy_vit
import tolerances
from vpt_jax.methods import convpass
from vpt_jax.methods import factory
from vpt_jax.models import vit_blocks
from vpt_jax.params import trees

TOLERANCE = tolerances.FORWARD_VS_NUMPY
D_CONV = 4


def numpy_convpass(y, p):
  """QGELU(Down y) -> 3x3 conv (padding 1) over the patch grid, CLS alone as a 1x1
  image -> QGELU -> Up; y (B, 1 + g^2, D) float64."""
  batch, tokens, _ = y.shape
  side = int(round(np.sqrt(tokens - 1)))
  h = ref.quick_gelu(ref.dense(y, p["down"]))
  conv = lambda image: numpy_vit.conv_same(image, p["conv"]["kernel"], p["conv"]["bias"], 1)
  cls = conv(h[:, :1].reshape(batch, 1, 1, -1)).reshape(batch, 1, -1)
  patches = conv(h[:, 1:].reshape(batch, side, side, -1)).reshape(batch, side * side, -1)
  return ref.dense(ref.quick_gelu(np.concatenate([cls, patches], axis=1)), p["up"])


@pytest.mark.numerics
def test_convpass_block_matches_numpy():
  # Random values in every leaf (the conv init does not matter here).
  hooks = convpass.ConvpassOptions(bottleneck=D_CONV, scale=0.6)
  x = adapter_fixtures.tokens()
  block, params = adapter_fixtures.random_block(hooks, x)
  p = ref.f64(params)
  side = lambda name: lambda y, stream: 0.6 * numpy_convpass(y, p[name])
  expected = ref.block(x, params, attention_side=side("convpass_attention"),
                       mlp_side=side("convpass_mlp"))
  out = np.asarray(block.apply({"params": params}, x))
  np.testing.assert_allclose(out, expected, **TOLERANCE)
  # CLS is convolved alone: the CLS-only block (skip_dead_work's last block) is exact.
  np.testing.assert_allclose(block.apply({"params": params}, x, None, 1), out[:, :1],
                             **TOLERANCE)


def test_convpass_init_starts_at_the_backbone():
  x = adapter_fixtures.tokens()
  for conv_init in convpass.CONV_INITS:
    flat = adapter_fixtures.initial_block_params(
        convpass.ConvpassOptions(bottleneck=D_CONV, conv_init=conv_init), x)
    for site in ("convpass_attention", "convpass_mlp"):
      kernel = flat[f"{site}/conv/kernel"]
      assert kernel.shape == (3, 3, D_CONV, D_CONV)
      if conv_init == "identity":  # zero but the identity at the centre tap
        expected = np.zeros_like(kernel)
        expected[1, 1] = np.eye(D_CONV)
        np.testing.assert_array_equal(kernel, expected)
      else:  # xavier-uniform over fan_in = fan_out = 9 d
        bound = np.sqrt(6 / (18 * D_CONV))
        # Filling U(-bound, bound), not a narrower init (torch's default Conv2d
        # init, U(+-1/sqrt(9 d)), would pass an upper bound alone).
        assert 0.9 * bound < np.abs(kernel).max() <= bound
        assert abs(kernel.std() - bound / np.sqrt(3)) < 0.15 * bound  # uniform's std
      down = flat[f"{site}/down/kernel"]  # xavier-uniform (D, d), not "lora"'s U(+-1/sqrt(D))
      down_bound = np.sqrt(6 / (adapter_fixtures.WIDTH + D_CONV))
      assert 0.8 * down_bound < np.abs(down).max() <= down_bound
      for leaf in ("down/bias", "conv/bias", "up/kernel", "up/bias"):
        assert not np.any(flat[f"{site}/{leaf}"]), (site, leaf)


def test_a_non_square_token_grid_is_refused():
  hooks = convpass.ConvpassOptions(bottleneck=D_CONV)
  x = adapter_fixtures.tokens()[:, :8]  # CLS + 7 patches
  with pytest.raises(ValueError, match="square grid"):
    adapter_fixtures.random_block(hooks, x)


@pytest.mark.parametrize("bottleneck, expected", [
    # OSU ViT_PEFT_Vision tune_output/default_vtab/processed_vtab/{cifar,caltech101}/
    # convpass/final_result.json "inserted_parameters" (bottleneck 8 and 16).
    (8, 327_552), (16, 664_320)])
def test_b16_counts_equal_the_official_logs(bottleneck, expected):
  hooks = convpass.ConvpassOptions(bottleneck=bottleneck)
  assert adapter_fixtures.b16_count(hooks, convpass.CONVPASS_PARAMS) == expected


def test_dropout_and_drop_path_act_only_while_training():
  hooks = convpass.ConvpassOptions(bottleneck=D_CONV, dropout=0.0)
  x = adapter_fixtures.tokens()
  block, params = adapter_fixtures.random_block(hooks, x)
  # Zero frozen attention and MLP branches: their own drop path cannot change the output,
  # so only the bypasses' drop path (at this block's rate) can.
  params = trees.unflatten({
      p: (np.zeros_like(v) if p.startswith(("MultiHeadDotProductAttention_0/out",
                                            "MlpBlock_0/Dense_1")) else v)
      for p, v in trees.flatten(params).items()})
  evaluated = block.apply({"params": params}, x)
  train = lambda rate, options=hooks: vit_blocks.Encoder1DBlock(
      adapter_fixtures.MLP, adapter_fixtures.HEADS, drop_path_rate=rate, hooks=options).apply(
          {"params": params}, x, None, None, True, None, False,
          rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(train(0.0), evaluated)
  assert not np.allclose(train(0.5), evaluated)
  assert not np.allclose(train(0.0, convpass.ConvpassOptions(bottleneck=D_CONV)), evaluated)
  assert hooks.stochastic_depth(0.0, True, train=True) == (0.1, False)  # PETL-ViT's rate
  assert sorted({p.split("/")[0] for p in trees.flatten(params)} - {
      "LayerNorm_0", "LayerNorm_1", "MultiHeadDotProductAttention_0", "MlpBlock_0"}) == [
          "convpass_attention", "convpass_mlp"]


@pytest.mark.parametrize("variant", ["swin-T/4w7", "resnet-50"])
def test_other_families_refuse_convpass(variant):
  config = fixtures.method_config("convpass", variant, 224)
  with pytest.raises(ValueError, match="'convpass' is not defined for .* backbones"):
    factory.validate_spec(factory.model_spec(config))
