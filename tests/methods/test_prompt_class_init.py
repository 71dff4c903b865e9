"""prompt_class_init: VPT's class-token prompt inits (final-cls, cls-nolastl,
cls-nofirstl) against a NumPy layer-wise forward and hand-derived indexing."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_vit
import tolerances
from vpt_jax.data import normalization
from vpt_jax.methods import prompt_class_init as pci
from vpt_jax.methods import prompts
from vpt_jax.models import vit

SIZE, DEPTH, WIDTH = 16, 4, 16
NORM = {key: np.asarray(value) for key, value in normalization.mean_std("imagenet").items()}


def _numpy_class_tokens(params, images):
  """[CLS entering block 0, leaving blocks 0 .. L-1 (pre-norm)] -> (B, L + 1, D)."""
  params = numpy_vit._f64(params)
  transformer = params["Transformer"]
  tokens = numpy_vit.patch_embed(images, params["embedding"]["kernel"], params["embedding"]["bias"])
  cls = np.broadcast_to(params["cls"], (len(images), 1, WIDTH))
  x = np.concatenate([cls, tokens], axis=1) + transformer["posembed_input"]["pos_embedding"]
  out = [x[:, 0]]
  for layer in range(DEPTH):
    x = numpy_vit.encoder_block(x, transformer[f"encoderblock_{layer}"])
    out.append(x[:, 0])
  return np.stack(out, axis=1)


@pytest.mark.numerics
def test_layerwise_class_tokens_match_numpy():
  model = vit.VisionTransformer(num_classes=3, variant="test4/4")
  params = fixtures.random_params(model, image_size=SIZE)
  images = fixtures.uniform_images(image_size=SIZE)
  np.testing.assert_allclose(np.asarray(pci.layerwise_class_tokens(model, params, images)),
                             _numpy_class_tokens(params, np.asarray(images, np.float64)),
                             **tolerances.FORWARD_VS_NUMPY)


def _spec(num_prompts=3, init="final-cls"):
  return dict(method="vpt_deep", variant="test4/4", dtype="float32", num_prompts=num_prompts,
              prompt_ablation=dict(init=init))


@pytest.mark.numerics
def test_class_means_average_each_class_and_initialise_sets_the_prompts():
  model = vit.VisionTransformer(num_classes=3, variant="test4/4",
                                hooks=prompts.VptOptions(3, deep=True))
  params = fixtures.random_params(model, image_size=SIZE)
  images = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
  labels = np.array([2, 0, 1, 2, 0])
  normalised = (images / 255.0 - NORM["mean"]) / NORM["std"]
  tokens = _numpy_class_tokens(params, normalised)
  expected = np.stack([tokens[[1, 4]].mean(0), tokens[[2]].mean(0), tokens[[0, 3]].mean(0)])
  means = pci.class_means(_spec(), params, images, labels, 3, NORM, batch_size=2)
  np.testing.assert_allclose(means, expected, **tolerances.FORWARD_VS_NUMPY)
  initialised = pci.initialise(_spec(init="cls-nofirstl"), params, images, labels, 3, NORM, 4)
  np.testing.assert_allclose(initialised["vpt"]["shallow"], expected[:, 1],
                             **tolerances.FORWARD_VS_NUMPY)
  np.testing.assert_allclose(initialised["vpt"]["deep"], expected[:, 2:].swapaxes(0, 1),
                             **tolerances.FORWARD_VS_NUMPY)
  assert pci.initialise(_spec(init="random"), params, images, labels, 3, NORM, 4) is params


def test_prompt_sets_index_the_class_tokens_as_the_reference():
  # E[j, i] = 10 * j + i: class j, position i in [CLS into block 0, ..., final CLS].
  means = (10 * np.arange(3)[:, None] + np.arange(DEPTH + 1)[None])[..., None].astype(float)
  final = pci.prompt_sets("final-cls", means, DEPTH)
  assert final.shape == (DEPTH, 3, 1) and (final[..., 0] == [4, 14, 24]).all()
  no_last = pci.prompt_sets("cls-nolastl", means, DEPTH)[..., 0]
  np.testing.assert_array_equal(no_last, 10 * np.arange(3)[None] + np.arange(DEPTH)[:, None])
  no_first = pci.prompt_sets("cls-nofirstl", means, 1)[..., 0]
  np.testing.assert_array_equal(no_first, [[1, 11, 21]])


@pytest.mark.parametrize("num_prompts, images, labels, message", [
    (4, np.zeros((2, SIZE, SIZE, 3), np.uint8), np.array([0, 1]), "num_prompts=3"),
    (3, [np.zeros((SIZE, SIZE, 3), np.uint8)], np.array([0]), "data.preprocess=resize"),
    (3, np.zeros((2, SIZE, SIZE, 3), np.uint8), np.array([0, 2]), "class 1 has none"),
])
def test_refusals(num_prompts, images, labels, message):
  model = vit.VisionTransformer(num_classes=3, variant="test4/4",
                                hooks=prompts.VptOptions(num_prompts, deep=True))
  params = fixtures.random_params(model, image_size=SIZE)
  with pytest.raises(ValueError, match=message):
    pci.initialise(_spec(num_prompts), params, images, labels, 3, NORM, 2)
