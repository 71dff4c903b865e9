"""The Flax ViT/VPT forward against the independent NumPy float64 reference."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import tolerances
import checkpoint_fixtures as fixtures
import numpy_vit
from vpt_jax.methods import prompts
from vpt_jax.models import vit

# (variant, image size): 4x4 patch grids with two different patch sizes.
CONFIGS = {"p4_img16": ("test/4", 16), "p8_img32": ("test/8", 32)}
PROMPT_MODES = {
    "none": {},
    "shallow": dict(hooks=prompts.VptOptions(3)),
    "deep": dict(hooks=prompts.VptOptions(3, deep=True)),
    "shallow_proj": dict(hooks=prompts.VptOptions(2, projection=5)),
    "deep_proj": dict(hooks=prompts.VptOptions(2, deep=True, projection=5)),
}
TOLERANCE = tolerances.FORWARD_VS_NUMPY


def _random_params(model, image_size, seed=3):
  """Random values in every leaf of the model's parameter tree (no trivial init)."""
  return fixtures.randomize(fixtures.param_shapes(model, image_size), seed)


def _images(image_size, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)


def _case(config, mode, pool, skip):
  return pytest.param(config, mode, pool, skip,
                      id=f"{config}-{mode}-{pool}-{'skip' if skip else 'full'}")


def _cases():
  # The first config gets the full cross product; the second, every prompt mode
  # (CLS pool) and every pool (deep prompts with projection), both code paths.
  for mode, prompt_kwargs in PROMPT_MODES.items():
    for pool in vit.POOL_TYPES:
      if pool == "prompt_pool" and not prompt_kwargs:
        continue  # needs prompts; the model refuses it (tested below)
      for skip in (True, False):
        yield _case("p4_img16", mode, pool, skip)
  for skip in (True, False):
    for mode in PROMPT_MODES:
      yield _case("p8_img32", mode, "original", skip)
    for pool in vit.POOL_TYPES[1:]:
      yield _case("p8_img32", "deep_proj", pool, skip)


@pytest.mark.numerics
@pytest.mark.parametrize("config,mode,pool,skip_dead_work", list(_cases()))
def test_matches_numpy_reference(config, mode, pool, skip_dead_work):
  variant, image_size = CONFIGS[config]
  model = vit.VisionTransformer(num_classes=4, variant=variant, pool=pool,
                                skip_dead_work=skip_dead_work, **PROMPT_MODES[mode])
  params = _random_params(model, image_size)
  images = _images(image_size)
  logits = np.asarray(model.apply({"params": params}, images))
  assert logits.shape == (2, 4)
  np.testing.assert_allclose(logits, numpy_vit.vit_forward(params, images, pool_type=pool),
                             **TOLERANCE)


@pytest.mark.numerics
@pytest.mark.parametrize("pool", vit.POOL_TYPES)
def test_features_match_numpy_reference(pool):
  model = vit.VisionTransformer(num_classes=4, variant="test/4", pool=pool,
                                **PROMPT_MODES["deep"])
  params = _random_params(model, 16)
  images = _images(16)
  features = np.asarray(model.apply({"params": params}, images, return_features=True))
  assert features.shape == (2, 16)
  np.testing.assert_allclose(
      features, numpy_vit.vit_forward(params, images, pool_type=pool, return_features=True),
      **TOLERANCE)


@pytest.mark.numerics
def test_layer_norm_epsilon_is_1e_6():
  # With O(1) activations eps is invisible at 1e-4; shrink the embedded tokens
  # (variance ~1e-6, comparable to eps) so the first LayerNorm depends on it.
  model = vit.VisionTransformer(num_classes=4, variant="test/4", **PROMPT_MODES["deep"])
  params = _random_params(model, 16)
  for tree, name in ((params["embedding"], "kernel"), (params["embedding"], "bias"),
                     (params, "cls"), (params["Transformer"]["posembed_input"],
                                       "pos_embedding"), (params["vpt"], "shallow")):
    tree[name] = tree[name] * np.float32(2e-3)
  images = _images(16)
  logits = np.asarray(model.apply({"params": params}, images))
  np.testing.assert_allclose(logits, numpy_vit.vit_forward(params, images), **TOLERANCE)


def test_prompt_pool_without_prompts_is_refused():
  model = vit.VisionTransformer(num_classes=2, variant="test/4", pool="prompt_pool")
  with pytest.raises(ValueError, match="num_prompts"):
    fixtures.param_shapes(model, 16)


# The dropout tests share one prompt configuration and the batch shape of the
# tests above, so the eagerly compiled kernels are reused.
DROPOUT_PROMPTS = dict(num_classes=4, variant="test/4")


def _dropout_model(prompt_dropout=0.0, **kwargs):
  model = vit.VisionTransformer(
      **DROPOUT_PROMPTS, hooks=prompts.VptOptions(3, deep=True, dropout=prompt_dropout),
      **kwargs)
  return model, _random_params(model, 16)


def _train_logits(model, params, images, seed):
  return np.asarray(model.apply({"params": params}, images, train=True,
                                rngs={"dropout": jax.random.key(seed)}))


@pytest.mark.numerics
def test_prompt_dropout_is_off_in_eval():
  model, params = _dropout_model(prompt_dropout=0.5)
  images = _images(16)
  first = model.apply({"params": params}, images, rngs={"dropout": jax.random.key(1)})
  second = model.apply({"params": params}, images, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
  np.testing.assert_allclose(np.asarray(first), numpy_vit.vit_forward(params, images),
                             **TOLERANCE)


@pytest.mark.numerics
def test_prompt_dropout_masks_differ_per_example_in_train():
  model, params = _dropout_model(prompt_dropout=0.5)
  same_image_twice = np.repeat(_images(16, batch=1), 2, axis=0)
  logits = _train_logits(model, params, same_image_twice, seed=7)
  # Dropout is applied after broadcasting the prompts to the batch.
  assert not np.allclose(logits[0], logits[1])
  eval_logits = np.asarray(model.apply({"params": params}, same_image_twice))
  np.testing.assert_allclose(eval_logits[0], eval_logits[1], **TOLERANCE)
  assert not np.allclose(logits, eval_logits)
  assert not np.allclose(logits, _train_logits(model, params, same_image_twice, seed=8))


@pytest.mark.numerics
def test_prompt_dropout_same_with_and_without_skip_dead_work():
  # The shortcut must be exact in training too: same rng, same masks, same logits.
  images = _images(16)
  outputs = []
  for skip in (True, False):
    model, params = _dropout_model(prompt_dropout=0.5, skip_dead_work=skip)
    outputs.append(_train_logits(model, params, images, seed=3))
  np.testing.assert_allclose(outputs[0], outputs[1], **TOLERANCE)


@pytest.mark.numerics
def test_backbone_dropout_stays_off_while_prompt_tuning():
  # VPT trains with the backbone in eval mode: only prompt dropout is stochastic.
  model, params = _dropout_model(dropout_rate=0.5, prompt_dropout=0.0)
  images = _images(16)
  train = _train_logits(model, params, images, seed=0)
  np.testing.assert_allclose(train, numpy_vit.vit_forward(params, images), **TOLERANCE)
  full_finetune, _ = _dropout_model(dropout_rate=0.5, backbone_dropout=True)
  assert not np.allclose(_train_logits(full_finetune, params, images, seed=0), train)
