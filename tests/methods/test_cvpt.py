"""CVPT (methods/cvpt.py) against the independent NumPy float64 reference, and its
structural guarantees (cvpt.md 1): prompts outside the sequence, the
cross-attention on the block's own attention parameters, the reference's init."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_vit
import tolerances
from vpt_jax.methods import cvpt as cvpt_lib
from vpt_jax.models import vit
from vpt_jax.params import freezing
from vpt_jax.params import trees

TOLERANCE = tolerances.FORWARD_VS_NUMPY
BASE = fixtures.TINY_VIT  # width 16, 2 heads, 2 blocks, 16 px -> 17 tokens
DEPTH, WIDTH, TOKENS = 2, 16, 17


# Every insert position; the exact "CLS only in the last block" shortcut on the default.
@pytest.mark.parametrize("insert, skip_dead_work",
                         [(i, False) for i in cvpt_lib.CVPT_INSERTS] + [(3, True)])
@pytest.mark.numerics
def test_cvpt_matches_numpy(insert, skip_dead_work):
  model = vit.VisionTransformer(**BASE, skip_dead_work=skip_dead_work,
                                hooks=cvpt_lib.CvptOptions(num_prompts=3, insert=insert))
  fixtures.assert_matches_numpy(model, fixtures.random_params(model), fixtures.uniform_images(),
                                cvpt_insert=insert)


def test_cvpt_insert_positions_differ():
  params, outputs = None, []
  for insert in cvpt_lib.CVPT_INSERTS:
    model = vit.VisionTransformer(**BASE, hooks=cvpt_lib.CvptOptions(3, insert=insert))
    params = params or fixtures.random_params(model)
    outputs.append(numpy_vit.vit_forward(params, fixtures.uniform_images(), cvpt_insert=insert))
  for i in range(len(outputs)):
    for j in range(i):
      assert not np.allclose(outputs[i], outputs[j], **TOLERANCE), (i + 1, j + 1)


def test_cvpt_adds_only_its_prompts_to_the_parameter_tree():
  plain = trees.flatten(fixtures.param_shapes(vit.VisionTransformer(**BASE), 16))
  cvpt = trees.flatten(fixtures.param_shapes(
      vit.VisionTransformer(**BASE, hooks=cvpt_lib.CvptOptions(num_prompts=7)), 16))
  # No attention copies: the cross-attention has no parameters of its own.
  assert set(cvpt) - set(plain) == {"cvpt/prompts"}
  assert set(plain) <= set(cvpt)
  assert cvpt["cvpt/prompts"].shape == (DEPTH, 7, WIDTH)
  extra = freezing.count(cvpt) - freezing.count(plain)
  assert extra == DEPTH * 7 * WIDTH


def test_cvpt_sequence_stays_one_plus_n_in_every_block():
  model = vit.VisionTransformer(**BASE, skip_dead_work=False,
                                hooks=cvpt_lib.CvptOptions(num_prompts=5))
  params = fixtures.random_params(model)
  _, state = model.apply({"params": params}, fixtures.uniform_images(), capture_intermediates=True,
                         mutable=["intermediates"])
  transformer = state["intermediates"]["Transformer"]
  for layer in range(DEPTH):
    block = transformer[f"encoderblock_{layer}"]
    assert block["__call__"][0].shape == (2, TOKENS, WIDTH)
    # The one attention module runs twice: self-attention, then cross-attention;
    # both keep one output row per token (never 1 + N + m).
    calls = block["MultiHeadDotProductAttention_0"]["__call__"]
    assert [c.shape for c in calls] == [(2, TOKENS, WIDTH)] * 2
    assert block["MlpBlock_0"]["__call__"][0].shape == (2, TOKENS, WIDTH)


@pytest.mark.numerics
def test_cvpt_cross_attention_reads_the_blocks_attention_parameters():
  model = vit.VisionTransformer(**BASE, hooks=cvpt_lib.CvptOptions(num_prompts=3))
  params = fixtures.random_params(model)
  images = fixtures.uniform_images()
  before = np.asarray(model.apply({"params": params}, images))
  # Perturb block 0's query kernel only.
  attention = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  original = {name: dict(attention[name]) for name in ("query", "key", "value", "out")}
  attention["query"]["kernel"] = attention["query"]["kernel"] + np.float32(0.7)
  # The reference: SA and CA both use the new kernel.
  after = fixtures.assert_matches_numpy(model, params, images)
  assert not np.allclose(before, after, **TOLERANCE)
  # A model whose cross-attention kept the old kernel (a copy) would differ.
  stale = numpy_vit.vit_forward(params, images, cross_attention_params={0: original})
  assert not np.allclose(after, stale, **TOLERANCE)


def test_cvpt_prompt_init_is_xavier_uniform_over_the_3d_tensor():
  # ViT-B's shapes: 12 blocks of m = 10 prompts of width 768.
  module = cvpt_lib.CrossPrompts(num_prompts=10, depth=12, width=768)
  variables = module.init(jax.random.key(0), 1, train=False)
  prompts = np.asarray(variables["params"]["prompts"])
  bound = math.sqrt(6 / (768 * (10 + 12)))  # sqrt(6 / (D (m + depth))) = 0.0188
  assert prompts.shape == (12, 10, 768)
  assert abs(bound - 0.0188) < 1e-4
  assert np.abs(prompts).max() <= bound
  assert np.abs(prompts).max() > 0.99 * bound
  np.testing.assert_allclose(prompts.var(), bound ** 2 / 3, rtol=0.02)  # uniform


def _cvpt_train_logits(copies, **options):
  """A CVPT model, its params, and train-mode logits of one image repeated."""
  model = vit.VisionTransformer(**BASE, hooks=cvpt_lib.CvptOptions(3, **options))
  params = fixtures.random_params(model)
  images = np.repeat(fixtures.uniform_images(batch=1), copies, axis=0)
  logits = np.asarray(model.apply({"params": params}, images, train=True,
                                  rngs={"dropout": jax.random.key(0)}))
  return model, params, images, logits


def test_cvpt_prompt_dropout_is_per_example_and_off_in_eval():
  model, params, images, train = _cvpt_train_logits(2, dropout=0.5, drop_path=0.0)
  assert not np.allclose(train[0], train[1])
  fixtures.assert_matches_numpy(model, params, images)  # eval: no dropout, no drop path


def test_cvpt_drop_path_is_per_example_and_spares_the_first_block():
  _, _, _, train = _cvpt_train_logits(8, dropout=0.0, drop_path=0.5)
  distinct = {tuple(np.round(row, 4)) for row in train}
  # Block 0's rate is 0 (linear ramp); block 1 keeps or drops each of its two
  # branches (SA, MLP) per example: at most 4 distinct rows of 8 identical images.
  assert 1 < len(distinct) <= 4
