"""The methods' forward passes against the independent NumPy float64 reference,
and CVPT's structural guarantees (cvpt.md 1): prompts outside the sequence, the
cross-attention on the block's own attention parameters, the reference's init."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
import checkpoint_fixtures as fixtures
import numpy_vit
from vpt_jax.methods import adapter
from vpt_jax.methods import cvpt as cvpt_lib
from vpt_jax.methods import lora
from vpt_jax.methods import prompts
from vpt_jax.methods import sidetune
from vpt_jax.models import vit
from vpt_jax.params import freezing
from vpt_jax.params import trees

pytestmark = pytest.mark.numerics  # run again under SSE4.2 in CI

TOLERANCE = tolerances.FORWARD_VS_NUMPY
BASE = dict(num_classes=4, variant="test/4")  # width 16, 2 heads, 2 blocks, 16 px -> 17 tokens
DEPTH, WIDTH, TOKENS = 2, 16, 17


def _params(model, seed=3):
  return fixtures.randomize(fixtures.param_shapes(model, 16), seed)


def _images(batch=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32)


def _compare(model, params, images, **numpy_kwargs):
  logits = np.asarray(model.apply({"params": params}, images))
  np.testing.assert_allclose(logits, numpy_vit.vit_forward(params, images, **numpy_kwargs),
                             **TOLERANCE)
  return logits


# Every insert position; the exact "CLS only in the last block" shortcut on the default.
@pytest.mark.parametrize("insert, skip_dead_work",
                         [(i, False) for i in cvpt_lib.CVPT_INSERTS] + [(3, True)])
def test_cvpt_matches_numpy(insert, skip_dead_work):
  model = vit.VisionTransformer(**BASE, skip_dead_work=skip_dead_work,
                                hooks=cvpt_lib.CvptOptions(num_prompts=3, insert=insert))
  _compare(model, _params(model), _images(), cvpt_insert=insert)


def test_cvpt_insert_positions_differ():
  params, outputs = None, []
  for insert in cvpt_lib.CVPT_INSERTS:
    model = vit.VisionTransformer(**BASE, hooks=cvpt_lib.CvptOptions(3, insert=insert))
    params = params or _params(model)
    outputs.append(numpy_vit.vit_forward(params, _images(), cvpt_insert=insert))
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
  params = _params(model)
  _, state = model.apply({"params": params}, _images(), capture_intermediates=True,
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


def test_cvpt_cross_attention_reads_the_blocks_attention_parameters():
  model = vit.VisionTransformer(**BASE, hooks=cvpt_lib.CvptOptions(num_prompts=3))
  params = _params(model)
  images = _images()
  before = np.asarray(model.apply({"params": params}, images))
  # Perturb block 0's query kernel only.
  attention = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  original = {name: dict(attention[name]) for name in ("query", "key", "value", "out")}
  attention["query"]["kernel"] = attention["query"]["kernel"] + np.float32(0.7)
  after = _compare(model, params, images)  # the reference: SA and CA both use the new kernel
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
  params = _params(model)
  images = np.repeat(_images(batch=1), copies, axis=0)
  logits = np.asarray(model.apply({"params": params}, images, train=True,
                                  rngs={"dropout": jax.random.key(0)}))
  return model, params, images, logits


def test_cvpt_prompt_dropout_is_per_example_and_off_in_eval():
  model, params, images, train = _cvpt_train_logits(2, dropout=0.5, drop_path=0.0)
  assert not np.allclose(train[0], train[1])
  _compare(model, params, images)  # eval: no dropout, no drop path


def test_cvpt_drop_path_is_per_example_and_spares_the_first_block():
  _, _, _, train = _cvpt_train_logits(8, dropout=0.0, drop_path=0.5)
  distinct = {tuple(np.round(row, 4)) for row in train}
  # Block 0's rate is 0 (linear ramp); block 1 keeps or drops each of its two
  # branches (SA, MLP) per example: at most 4 distinct rows of 8 identical images.
  assert 1 < len(distinct) <= 4


@pytest.mark.parametrize("init", adapter.ADAPTER_INITS)
def test_adapter_matches_numpy_and_starts_at_the_backbone(init):
  options = adapter.AdapterOptions(reduction=4, init=init)
  model = vit.VisionTransformer(**BASE, hooks=options)
  params = _params(model)
  _compare(model, params, _images())  # random adapter values: the math
  assert {p.split("/adapter/")[1] for p in trees.flatten(params) if "/adapter/" in p} == {
      "down/kernel", "down/bias", "up/kernel", "up/bias"}
  initial = adapter.Adapter(4, init).init(jax.random.key(0), jnp.zeros((1, 1, WIDTH)))
  for path, value in trees.flatten(initial["params"]).items():
    # Up (and every bias) starts at zero, so the model starts at the backbone;
    # the reference also zeroes Down's kernel.
    zero_expected = init == "vpt_reference" or path.startswith("up/") or path.endswith("bias")
    assert np.all(np.asarray(value) == 0) == zero_expected, path


def test_lora_matches_numpy_and_starts_exact():
  options = lora.LoraOptions(rank=2, alpha=3.0, targets=("query", "key", "value", "out"))
  model = vit.VisionTransformer(**BASE, hooks=options)
  params = _params(model)
  _compare(model, params, _images(), lora_alpha=3.0)
  # B = 0: the LoRA model equals the plain one whatever A is.
  flat = trees.flatten(params)
  zeroed = trees.unflatten({p: (np.zeros_like(v) if p.endswith("/b") else v)
                                for p, v in flat.items()})
  plain = trees.unflatten({p: v for p, v in flat.items() if "lora_" not in p})
  np.testing.assert_allclose(np.asarray(model.apply({"params": zeroed}, _images())),
                             numpy_vit.vit_forward(plain, _images()), **TOLERANCE)


@pytest.mark.parametrize("dimension", ["all", "hidden", "sequence"])
def test_vfpt_matches_numpy(dimension):
  model = vit.VisionTransformer(**BASE, hooks=prompts.VfptOptions(
                                    4, deep=True, percentage=0.5, dimension=dimension))
  _compare(model, _params(model), _images(), fourier_prompts=2, fourier_dimension=dimension)


def test_e2vpt_matches_numpy():
  model = vit.VisionTransformer(**BASE, hooks=prompts.E2vptOptions(
                                    3, deep=True, kv_prompts=2))
  params = _params(model)
  assert params["e2vpt"]["kv_prompts"].shape == (DEPTH, 2, 2, 8)  # (L, H, N_kv, D/H)
  _compare(model, params, _images())


def test_mlp_head_matches_numpy_in_eval():
  model = vit.VisionTransformer(**BASE, head_hidden_layers=2)
  variables = fixtures.randomize(
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3))), 4)
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])  # var > 0
  logits = np.asarray(model.apply(variables, _images()))
  np.testing.assert_allclose(
      logits, numpy_vit.vit_forward(variables["params"], _images(),
                                    batch_stats=variables["batch_stats"]), **TOLERANCE)


def test_sidetune_matches_numpy_and_starts_as_an_even_blend():
  model = vit.VisionTransformer(**BASE, hooks=sidetune.SideOptions((4, 8)))
  params = _params(model)
  _compare(model, params, _images())
  initial = sidetune.SideNetwork((4, 8)).init(jax.random.key(0), _images(),
                                         np.zeros((2, WIDTH), np.float32))
  assert float(initial["params"]["alpha"]) == 0.0  # sigmoid(0) = 1/2
