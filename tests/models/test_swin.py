"""The Swin model: forward pass against an independent NumPy Swin (tests/numpy_swin.py),
drop path, and the prompts' init and dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_swin as ref
from vpt_jax.models import swin
from vpt_jax.models import swin_family
from vpt_jax.params import trees


# ---------------------------------------------------------------------------
# Flax model with converted weights.


def flax_params(model, variant, image_size, sd, prompts=None):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, 3)))["params"]
  flat = {k: np.zeros(v.shape, v.dtype) for k, v in trees.flatten(shapes).items()}
  converted = swin_family.convert_torch(sd, variant)
  for key, value in converted.items():
    assert flat[key].shape == value.shape, key
    flat[key] = value
  for name, value in (prompts or {}).items():
    flat[f"vpt/{name}"] = value
  return trees.unflatten(flat)


def flax_features(variant, sd, images, prompts=None, deep=False, reference_order=False):
  model = swin.SwinTransformer(num_classes=5, variant=variant,
                               num_prompts=0 if prompts is None else len(prompts["shallow"]),
                               deep_prompts=deep, reference_window_order=reference_order)
  params = flax_params(model, variant, images.shape[1], sd, prompts)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, return_features=True))
  return np.asarray(apply(params, images))


@pytest.mark.numerics
# 32 px, window 2: swin-test has 16 then 4 windows (both stages shifted);
# swin-test3 has 16, 4, then one unshifted window (the 2 x 2 map equals the window).
@pytest.mark.parametrize("variant, kind", [
    ("swin-test/4w2", "none"),
    ("swin-test/4w2", "shallow"),
    ("swin-test3/4w2", "deep"),
])
def test_forward_matches_the_numpy_reference(variant, kind):
  image_size, num_prompts, batch = 32, 3, 3
  deep = kind == "deep"
  sd = ref.official_state_dict(variant)
  prompts = None if kind == "none" else ref.random_prompts(variant, num_prompts, deep)
  images = np.random.default_rng(2).standard_normal((batch, image_size, image_size, 3))
  images = images.astype(np.float32)
  whole_batch = ref.np_swin_features(images.astype(np.float64), sd, variant, prompts, deep)
  one_by_one = np.concatenate([
      ref.np_swin_features(images[i:i + 1].astype(np.float64), sd, variant, prompts, deep)
      for i in range(batch)])
  # By default every image sees and averages only its own prompts (the reference at B = 1).
  np.testing.assert_allclose(flax_features(variant, sd, images, prompts, deep), one_by_one,
                             atol=1e-4, rtol=1e-4)
  if kind == "shallow":
    # The reference's batched order mixes the images' prompt outputs ...
    assert np.abs(whole_batch - one_by_one).max() > 1e-3
    # ... and reference_window_order reproduces it.
    np.testing.assert_allclose(
        flax_features(variant, sd, images, prompts, deep, reference_order=True), whole_batch,
        atol=1e-4, rtol=1e-4)
  else:
    # Without prompts nothing mixes; with deep prompts every block's incoming prompts
    # are the same for all images and only the last stage's prompt outputs reach the
    # features, and one window there leaves nothing to mix.
    np.testing.assert_allclose(whole_batch, one_by_one, atol=1e-10)


def test_drop_path_acts_only_when_the_backbone_trains():
  sd = ref.official_state_dict("swin-test/4w2")
  images = np.random.default_rng(4).standard_normal((4, 16, 16, 3)).astype(np.float32)
  model = swin.SwinTransformer(num_classes=5, variant="swin-test/4w2", drop_path_rate=0.5,
                               backbone_dropout=True)
  params = flax_params(model, "swin-test/4w2", 16, sd)
  frozen = model.clone(backbone_dropout=False)  # every method but full

  @jax.jit
  def features(p, x):
    run = lambda m, key, train: m.apply({"params": p}, x, train=train, return_features=True,
                                        rngs={"dropout": jax.random.key(key)})
    return run(model, 1, True), run(model, 2, True), run(frozen, 1, True)

  first, second, frozen_train = map(np.asarray, features(params, images))
  assert np.abs(first - second).max() > 1e-3
  # A frozen backbone in training mode is the deterministic (eval) Swin.
  np.testing.assert_allclose(frozen_train, ref.np_swin_features(images.astype(np.float64), sd,
                                                                "swin-test/4w2"), atol=1e-4)


# ---------------------------------------------------------------------------
# Prompts: init and dropout.


def test_prompt_init_uses_the_stage0_bound_for_every_stage():
  size = swin.SWIN_SIZES["B"]
  module = swin.SwinPrompts(4, size.widths, size.depths, patch_size=4, deep=True)
  params = jax.jit(lambda: module.init(jax.random.key(0), 2, train=False))()["params"]
  bound = 0.1846372  # vpt.md 1.3: sqrt(6 / (3 * 4 * 4 + 128))
  for name, value in params.items():
    assert np.abs(value).max() <= bound + 1e-7, name
    assert np.abs(value).max() > 0.9 * bound, name
  assert {k: v.shape for k, v in params.items()} == {
      "shallow": (4, 128), "deep_0": (1, 4, 128), "deep_1": (2, 4, 256),
      "deep_2": (18, 4, 512), "deep_3": (2, 4, 1024)}


def test_prompt_dropout_masks_shallow_per_example_and_deep_per_stage():
  module = swin.SwinPrompts(6, (8, 16), (2, 2), patch_size=4, deep=True, dropout_rate=0.5)
  variables = module.init(jax.random.key(0), 4, train=False)
  shallow, blocks = jax.jit(lambda v: module.apply(v, 4, train=True,
                                                   rngs={"dropout": jax.random.key(3)}))(variables)
  shallow = np.asarray(shallow)
  # Shallow: broadcast first, then dropout -> different masks per example.
  assert not all(np.array_equal(shallow[0] == 0, shallow[i] == 0) for i in range(1, 4))
  # Deep: dropout on the stage tensor, then broadcast -> one mask for the batch.
  assert blocks[0][0] is None and len(blocks[0]) == 2 and len(blocks[1]) == 2
  for stage in blocks:
    for block in stage[1:] if stage[0] is None else stage:
      block = np.asarray(block)
      assert (block == 0).any()
      for i in range(1, 4):
        np.testing.assert_array_equal(block[i], block[0])
