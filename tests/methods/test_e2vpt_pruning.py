"""E2VPT's pruning and rewinding (methods/e2vpt_pruning.py, E2vptOptions' masks):
the masked forward against NumPy, the mask importance against float64 central
differences, and the reference's pruning levels worked out by hand."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import checkpoint_fixtures as fixtures
import numpy_vit
import tolerances
from configs import common
from vpt_jax.methods import e2vpt_pruning as pruning
from vpt_jax.methods import factory
from vpt_jax.methods import prompts
from vpt_jax.models import vit

N, PIECES, WIDTH, SIZE = 3, 4, 16, 16


def _numpy_mask(tokens, pieces):
  """t[n] * s[n, d mod pieces], written out entry by entry."""
  full = np.zeros((len(tokens), WIDTH))
  for n in range(len(tokens)):
    for d in range(WIDTH):
      full[n, d] = tokens[n] * pieces[n, d % pieces.shape[1]]
  return full


def _masked_params(params, tokens, pieces):
  """The params with the mask folded into every prompt set (NumPy's forward reads vpt/)."""
  full = _numpy_mask(np.asarray(tokens, np.float64), np.asarray(pieces, np.float64))
  vpt = {"shallow": np.asarray(params["vpt"]["shallow"], np.float64) * full,
         "deep": np.asarray(params["vpt"]["deep"], np.float64) * full}
  return {**{k: v for k, v in params.items() if k != "e2vpt_masks"}, "vpt": vpt}


def _model(**mask_fields):
  return vit.VisionTransformer(num_classes=4, variant="test/4", hooks=prompts.E2vptOptions(
      N, deep=True, kv_prompts=2, pieces=PIECES, **mask_fields))


@pytest.mark.numerics
def test_learned_masks_multiply_every_prompt_set():
  model = _model(learn_masks=True)
  params = fixtures.random_params(model, image_size=SIZE)
  masks = params["e2vpt_masks"]
  assert masks["tokens"].shape == (N,) and masks["pieces"].shape == (N, PIECES)
  images = fixtures.uniform_images(image_size=SIZE)
  np.testing.assert_allclose(
      np.asarray(model.apply({"params": params}, images)),
      numpy_vit.vit_forward(_masked_params(params, masks["tokens"], masks["pieces"]), images),
      **tolerances.FORWARD_VS_NUMPY)


@pytest.mark.numerics
def test_rewinding_masks_are_fixed_zeros():
  model = _model(pruned_tokens=(1,), pruned_pieces=((0, 2), (2, 0), (2, 3)))
  params = fixtures.random_params(model, image_size=SIZE)
  assert "e2vpt_masks" not in params  # nothing to train
  tokens = np.array([1.0, 0.0, 1.0])
  pieces = np.ones((N, PIECES))
  pieces[0, 2] = pieces[2, 0] = pieces[2, 3] = 0.0
  images = fixtures.uniform_images(image_size=SIZE)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, images)),
                             numpy_vit.vit_forward(_masked_params(params, tokens, pieces), images),
                             **tolerances.FORWARD_VS_NUMPY)


def _numpy_loss(params, tokens, pieces, images, labels):
  logits = numpy_vit.vit_forward(_masked_params(params, tokens, pieces), images)
  logits = logits - logits.max(axis=1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels].mean()


def _largest_terms(model, params, batches):
  """(max |g p s|, max |g p t|) over the batches and prompt entries: the terms whose
  sums over the prompt sets and dims are the token and piece scores, with g the loss
  gradient at a masked entry p t s (read off d loss / d p = g t s)."""
  def loss(p, images, labels):
    logits = model.apply({"params": p}, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  masks = params["e2vpt_masks"]
  tokens = np.abs(np.asarray(masks["tokens"], np.float64))[:, None]
  pieces = np.abs(np.tile(np.asarray(masks["pieces"], np.float64), (1, WIDTH // PIECES)))
  token_term = piece_term = 0.0
  for images, labels in batches:
    grads = jax.grad(loss)(params, images, labels)["vpt"]
    for name in ("shallow", "deep"):
      gpts = np.abs(np.asarray(grads[name], np.float64) * np.asarray(params["vpt"][name]))
      token_term = max(token_term, float(np.max(gpts / tokens)))
      piece_term = max(piece_term, float(np.max(gpts / pieces)))
  return token_term, piece_term


@pytest.mark.numerics
def test_importance_is_the_mean_mask_gradient():
  model = _model(learn_masks=True)
  params = fixtures.random_params(model, image_size=SIZE)
  batches = [(fixtures.uniform_images(image_size=SIZE, seed=seed), np.array([seed, 3]))
             for seed in (0, 1)]
  token_scores, piece_scores = pruning.mask_importance(model, params, batches)
  # One float32 path (the gradients) against float64 central differences (whose own
  # error, ~1e-10 here, is negligible). A score is a sum of terms far larger than
  # itself: LayerNorm is nearly blind to a token's scale, so its terms (up to ~0.2)
  # cancel to 1e-4 .. 1e-7. Its rounding scales with the terms, not with the score,
  # so no relative tolerance fits (the score of -4e-7 is off by 2e-3 of itself). The
  # bound is FORWARD_VS_NUMPY's: half the two-path bound with the terms' size, sums
  # at most 32 long (the MLP's hidden units; a score sums 2 sets x 16 dims) and
  # 17 chained (4 per block, 2 blocks, forward and backward, then the score's sum).
  token_term, piece_term = _largest_terms(model, params, batches)
  token_atol = tolerances.rounding_atol(token_term, 32, 17) / 2
  piece_atol = tolerances.rounding_atol(piece_term, 32, 17) / 2
  tokens = np.asarray(params["e2vpt_masks"]["tokens"], np.float64)
  pieces = np.asarray(params["e2vpt_masks"]["pieces"], np.float64)
  eps = 1e-5
  for n in range(N):
    step = np.eye(N)[n] * eps
    expected = np.mean([(_numpy_loss(params, tokens + step, pieces, x, y)
                         - _numpy_loss(params, tokens - step, pieces, x, y)) / (2 * eps)
                        for x, y in batches])
    np.testing.assert_allclose(token_scores[n], expected, rtol=0, atol=token_atol)
  step = np.zeros((N, PIECES))
  step[1, 2] = eps
  expected = np.mean([(_numpy_loss(params, tokens, pieces + step, x, y)
                       - _numpy_loss(params, tokens, pieces - step, x, y)) / (2 * eps)
                      for x, y in batches])
  np.testing.assert_allclose(piece_scores[1, 2], expected, rtol=0, atol=piece_atol)


def test_prune_counts_follow_the_reference_by_hand():
  # 5 tokens, at least 1 kept: int(5 p / 100) for p = 10 .. 90.
  assert pruning.prune_counts(5, 1) == [0, 1, 1, 2, 2, 3, 3, 4, 4]
  # 16 pieces, at least 4 kept: 90% would prune 14 > 12, so 12 and stop.
  assert pruning.prune_counts(16, 4) == [1, 3, 4, 6, 8, 9, 11, 12, 12]


def test_pruning_levels_take_the_lowest_scores():
  token_scores = np.array([0.3, -0.2, 0.1, -0.5, 0.0])
  piece_scores = np.zeros((5, 4))
  tokens, pieces = pruning.pruning_levels(token_scores, piece_scores, percents=(40, 60))
  assert tokens == [[1, 3], [1, 3, 4]]
  # 4 pieces with at least 4 kept: 40% of 4 = 1 > 0 allowed -> 0 pieces, and stop.
  assert pieces == [[]]
  # 8 pieces: 50% = 4 <= 8 - 4, the 4 lowest per token (ties keep index order).
  piece_scores = np.array([[0.2, -0.1, 0.4, 0.0, 0.3, -0.3, 0.1, 0.0],
                           [0.0, 0.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
  _, pieces = pruning.pruning_levels(np.zeros(2), piece_scores, percents=(50,))
  assert pieces == [[[0, 1], [0, 3], [0, 5], [0, 7], [1, 0], [1, 1], [1, 2], [1, 4]]]


def test_parse_pruned_pieces():
  assert pruning.parse_pruned_pieces("0:1 5; 2:3") == [[0, 1], [0, 5], [2, 3]]
  assert pruning.parse_pruned_pieces("") == []
  with pytest.raises(ValueError, match="token:piece"):
    pruning.parse_pruned_pieces("0 1")


def _config(**e2vpt):
  config = common.base_config()
  common.apply_method(config, "e2vpt")
  config.model.variant = "test/4"
  config.model.image_size = SIZE
  config.prompt.num_prompts = N
  for key, value in e2vpt.items():
    setattr(config.e2vpt, key, value)
  return config


def test_spec_masks_section_and_trainable_masks():
  spec = factory.model_spec(_config(prune=True, pieces=4))
  assert spec["e2vpt"]["masks"] == dict(learn=True, pieces=4, pruned_tokens=[],
                                        pruned_pieces=[])
  assert "masks" not in factory.model_spec(_config())["e2vpt"]
  rules = factory.trainable_rules(_config(prune=True, pieces=4))
  assert any(pattern == r"e2vpt(_masks)?/.*" and label == "train" for pattern, label in rules)
  shapes = factory.variable_shapes(factory.build_model(spec, 4), SIZE)["params"]
  assert shapes["e2vpt_masks"]["pieces"].shape == (N, 4)


@pytest.mark.parametrize("settings, message", [
    (dict(prune=True, pieces=5), "must divide the width 16"),
    (dict(prune=True, pruned_tokens="1"), "set one or the other"),
    (dict(pruned_tokens="3"), r"outside \[0, 3\)"),
    (dict(pruned_pieces="0:16"), r"piece outside \[0, 16\)"),
])
def test_bad_mask_settings_are_refused(settings, message):
  with pytest.raises(ValueError, match=message):
    factory.validate_spec(factory.model_spec(_config(**settings)))
