"""Houlsby, AdaptFormer and Adapter+ (methods/bottleneck_adapters.py) against NumPy float64."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import adapter_fixtures
import checkpoint_fixtures as fixtures
import numpy_adapters as ref
import numpy_vit
import tolerances
from vpt_jax import errors
from vpt_jax.methods import bottleneck_adapters as adapters
from vpt_jax.methods import factory
from vpt_jax.params import trees

TOLERANCE = tolerances.FORWARD_VS_NUMPY


def _forward(hooks, seed=3, **kwargs):
  """(Flax block output in eval, its params, the input)."""
  x = adapter_fixtures.tokens()
  block, params = adapter_fixtures.random_block(hooks, x, seed)
  return np.asarray(block.apply({"params": params}, x, **kwargs)), params, x


@pytest.mark.numerics
def test_houlsby_matches_numpy():
  hooks = adapters.HoulsbyOptions(bottleneck=4, scale=0.7, dropout=0.1)
  out, params, x = _forward(hooks)
  p = ref.f64(params)
  # OSU's sequential_after: branch + s * Up(ReLU(Down(branch))), after attention and MLP.
  adapt = lambda name: lambda a: a + 0.7 * ref.bottleneck(a, p[name], ref.relu)
  expected = ref.block(x, params, attention_branch=adapt("houlsby_attention"),
                       mlp_branch=adapt("houlsby_mlp"))
  np.testing.assert_allclose(out, expected, **TOLERANCE)


@pytest.mark.numerics
@pytest.mark.parametrize("norm", adapters.ADAPTFORMER_NORMS)
def test_adaptformer_matches_numpy(norm):
  hooks = adapters.AdaptFormerOptions(bottleneck=4, scale=0.3, norm=norm)
  out, params, x = _forward(hooks)
  p = ref.f64(params)["adaptformer"]

  def side(y, stream):
    del y  # the official branch reads the stream after the attention residual
    source = ref.torch_layer_norm(stream, p["norm"]) if norm == "in" else stream
    up = 0.3 * ref.bottleneck(source, p, ref.relu)
    return ref.torch_layer_norm(up, p["norm"]) if norm == "out" else up

  np.testing.assert_allclose(out, ref.block(x, params, mlp_side=side), **TOLERANCE)
  assert ("norm" in p) == (norm != "none")


@pytest.mark.numerics
def test_adapter_plus_matches_numpy():
  out, params, x = _forward(adapters.AdapterPlusOptions(bottleneck=4, drop_path=0.1))
  p = ref.f64(params)["adapter_plus"]
  # The post-adapter: x + scale (D,) * Up(GELU(Down(x))) on the block's output.
  post = lambda stream: stream + p["scale"] * ref.bottleneck(stream, p, numpy_vit.gelu)
  np.testing.assert_allclose(out, ref.block(x, params, output=post), **TOLERANCE)


@pytest.mark.numerics
@pytest.mark.parametrize("hooks", [adapters.HoulsbyOptions(bottleneck=4),
                                   adapters.AdaptFormerOptions(bottleneck=4),
                                   adapters.AdapterPlusOptions(bottleneck=4)],
                         ids=["houlsby", "adaptformer", "adapter_plus"])
def test_cls_only_block_is_the_first_row_of_the_full_block(hooks):
  full, params, x = _forward(hooks)
  block, _ = adapter_fixtures.random_block(hooks, x)
  cls_only = block.apply({"params": params}, x, None, 1)
  np.testing.assert_allclose(cls_only, full[:, :1], **TOLERANCE)


def test_initialisations_follow_the_official_codes():
  x = adapter_fixtures.tokens()
  width = adapter_fixtures.WIDTH
  houlsby = adapter_fixtures.initial_block_params(adapters.HoulsbyOptions(bottleneck=4), x)
  for site in ("houlsby_attention", "houlsby_mlp"):
    # OSU 'xavier': both kernels xavier-uniform, biases N(0, 1e-6^2).
    bound = np.sqrt(6 / (width + 4))
    for name in ("down", "up"):
      kernel = houlsby[f"{site}/{name}/kernel"]
      # Filling U(+-bound), not a narrower init (torch's default Linear init,
      # U(+-1/sqrt(fan_in)), would pass an upper bound alone).
      assert 0.8 * bound < np.abs(kernel).max() <= bound, name
      assert abs(kernel.std() - bound / np.sqrt(3)) < 0.2 * bound, name  # uniform's std
      assert 0 < np.abs(houlsby[f"{site}/{name}/bias"]).max() < 1e-5
  adaptformer = adapter_fixtures.initial_block_params(
      adapters.AdaptFormerOptions(bottleneck=4, norm="in"), x)
  # LoRA init: Down U(+-1/sqrt(D)), everything else zero; LayerNorm (1, 0).
  assert 0 < np.abs(adaptformer["adaptformer/down/kernel"]).max() <= 1 / np.sqrt(width)
  for leaf in ("down/bias", "up/kernel", "up/bias", "norm/bias"):
    assert not np.any(adaptformer[f"adaptformer/{leaf}"]), leaf
  np.testing.assert_array_equal(adaptformer["adaptformer/norm/scale"], np.ones(width))
  plus = adapter_fixtures.initial_block_params(adapters.AdapterPlusOptions(bottleneck=4), x)
  # Houlsby init: N(0, 0.01^2) truncated at +-0.02; biases zero; scale ones.
  for name in ("down", "up"):
    kernel = plus[f"adapter_plus/{name}/kernel"]
    assert 0 < np.abs(kernel).max() <= 0.02
    assert not np.any(plus[f"adapter_plus/{name}/bias"])
  np.testing.assert_array_equal(plus["adapter_plus/scale"], np.ones(width))


def test_adaptformer_starts_at_the_backbone():
  x = adapter_fixtures.tokens()
  hooks = adapters.AdaptFormerOptions(bottleneck=4)
  block, params = adapter_fixtures.random_block(hooks, x)
  flat = trees.flatten(params)
  zero_up = trees.unflatten({p: (np.zeros_like(v) if "adaptformer/up" in p else v)
                             for p, v in flat.items()})
  np.testing.assert_allclose(block.apply({"params": zero_up}, x), ref.block(x, params),
                             **TOLERANCE)


@pytest.mark.parametrize("hooks", [adapters.HoulsbyOptions(bottleneck=4, dropout=0.5),
                                   adapters.AdapterPlusOptions(bottleneck=4, drop_path=0.5)],
                         ids=["houlsby-dropout", "adapter_plus-drop_path"])
def test_method_dropout_acts_only_while_training(hooks):
  # While training (the block's drop path on, at rate 0 here) the hooks draw from the
  # "dropout" rng; in evaluation they change nothing.
  evaluated, params, x = _forward(hooks)
  block, _ = adapter_fixtures.random_block(hooks, x)
  trained = [np.asarray(block.apply({"params": params}, x, None, None, True, None, False,
                                    rngs={"dropout": jax.random.key(s)}))
             for s in (1, 2)]
  assert not np.allclose(trained[0], evaluated) and not np.allclose(trained[0], trained[1])
  np.testing.assert_array_equal(
      block.apply({"params": params}, x, None, None, True, None, True,
                  rngs={"dropout": jax.random.key(1)}), evaluated)


@pytest.mark.parametrize("hooks, rate", [(adapters.HoulsbyOptions(), 0.1),
                                         (adapters.AdaptFormerOptions(), 0.0),
                                         (adapters.AdapterPlusOptions(), 0.1)])
def test_backbone_stochastic_depth_is_the_official_one_while_training(hooks, rate):
  # OSU's and adapter_plus's drop_path_rate 0.1; AdaptFormer's main_image.py 0.
  assert hooks.backbone_drop_path == rate
  if rate:
    assert hooks.stochastic_depth(0.0, True, train=True) == (rate, False)
  assert hooks.stochastic_depth(0.0, True, train=False)[1]


# ViT-B/16 (D = 768, 12 blocks), the methods' parameters without the head.
@pytest.mark.parametrize("hooks, pattern, expected", [
    # OSU ViT_PEFT_Vision tune_output/default_vtab/processed_vtab/<task>/rand_h_adapter/
    # final_result.json "inserted_parameters": caltech101 (bottleneck 8) 313536,
    # dsprites_loc (4) 165984, sun397 (32) 1198848.
    (adapters.HoulsbyOptions(bottleneck=8), adapters.HOULSBY_PARAMS, 313_536),
    (adapters.HoulsbyOptions(bottleneck=4), adapters.HOULSBY_PARAMS, 165_984),
    (adapters.HoulsbyOptions(bottleneck=32), adapters.HOULSBY_PARAMS, 1_198_848),
    # ... /adaptformer/final_result.json: cifar (16) 304320, oxford_iiit_pet (4) 82992,
    # caltech101 (32) 599424.
    (adapters.AdaptFormerOptions(bottleneck=16), adapters.ADAPTFORMER_PARAMS, 304_320),
    (adapters.AdaptFormerOptions(bottleneck=4), adapters.ADAPTFORMER_PARAMS, 82_992),
    (adapters.AdaptFormerOptions(bottleneck=32), adapters.ADAPTFORMER_PARAMS, 599_424),
    # Adapter+ (visinf/adapter_plus Adapter, scaling "channel", bias): per block
    # Down 768 x 8 + 8, Up 8 x 768 + 768, scale 768 (the repository publishes no count).
    (adapters.AdapterPlusOptions(bottleneck=8), adapters.ADAPTER_PLUS_PARAMS,
     12 * (768 * 8 + 8 + 8 * 768 + 768 + 768)),
], ids=["houlsby-8", "houlsby-4", "houlsby-32", "adaptformer-16", "adaptformer-4",
        "adaptformer-32", "adapter_plus-8"])
def test_b16_counts_equal_the_official_logs(hooks, pattern, expected):
  assert adapter_fixtures.b16_count(hooks, pattern) == expected


@pytest.mark.parametrize("method", ["houlsby", "adaptformer", "adapter_plus"])
@pytest.mark.parametrize("variant", ["swin-T/4w7", "resnet-50"])
def test_other_families_refuse_the_adapters(method, variant):
  config = fixtures.method_config(method, variant, 224)
  with pytest.raises(ValueError, match=f"'{method}' is not defined for .* backbones"):
    factory.validate_spec(factory.model_spec(config))


@pytest.mark.parametrize("override, message", [
    ({"houlsby.bottleneck": 0}, r"^houlsby.bottleneck 0 must be between 1 and the width 16; "
                                r"set --config.houlsby.bottleneck in that range$"),
    ({"houlsby.dropout": 1.0}, r"^houlsby.dropout 1.0 must be in \[0, 1\); "
                               r"set --config.houlsby.dropout in that range$"),
])
def test_bad_settings_are_one_line_user_errors(override, message):
  # A UserError, so the command line prints it as one line (not a traceback).
  config = fixtures.method_config("houlsby", "test4/4", 16, **override)
  with pytest.raises(errors.UserError, match=message):
    factory.validate_spec(factory.model_spec(config))
