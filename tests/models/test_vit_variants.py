"""MAE and MoCo v3 ViTs (vpt.md 1.8): their variants, fixed embeddings, forward and methods
(their checkpoints' conversion is in test_vit_family.py).

The checkpoints are written in the official key layouts (timm names: MAE's
``{"model": ...}`` with the encoder's ``norm``, MoCo v3's linear-probe
``{"state_dict": {"module.*"}, "epoch", ...}`` with a classifier ``head``) in
torch's zip format by ``torch_fixtures``; the expected values are spelt out
index by index, and the forward is recomputed in NumPy float64.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
import checkpoint_fixtures as fixtures
import numpy_vit
from flavour_fixtures import D, DEPTH, GRID, IMAGE, PATCH, POSEMB
from flavour_fixtures import flavour_spec as _spec
from flavour_fixtures import write_official_file
from method_fixtures import train_steps
from vpt_jax.params.trees import flatten, unflatten
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.models import position_embeddings
from vpt_jax.models import vit_variants
from vpt_jax.models import vit
from vpt_jax.params import freezing
from vpt_jax.params import trees

TOLERANCE = tolerances.FORWARD_VS_NUMPY
MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

# --------------------------------------------------------------------------
# Variants and the fixed position embeddings.


def test_variant_prefixes_select_the_flavour():
  for variant, flavour in [("mae-B/16", "mae"), ("moco-B/16", "moco"), ("B/16", ""),
                           ("mae-L/16", "mae"), ("mae-test/4", "mae")]:
    assert vit_variants.variant_flavour(variant) == flavour
  assert vit_variants.decode_variant("mae-H/14") == (vit_variants.VIT_SIZES["H"], 14)
  assert vit_variants.decode_variant("moco-B/16") == vit_variants.decode_variant("B/16")
  with pytest.raises(ValueError, match="mae-B/16"):
    vit_variants.decode_variant("simclr-B/16")


@pytest.mark.parametrize("rows_first", [True, False])
def test_sincos_embedding_matches_the_closed_form(rows_first):
  side, width = 3, 16
  table = position_embeddings.sincos_posemb(side, width, rows_first)
  assert table.shape == (1, 1 + side * side, width) and table.dtype == np.float32
  np.testing.assert_array_equal(table[0, 0], 0.0)  # the CLS row
  quarter = width // 4
  for t in range(side * side):
    row, col = t // side, t % side
    first, second = (row, col) if rows_first else (col, row)
    for k in range(quarter):
      omega = 10000.0 ** (-k / quarter)
      expected = [math.sin(first * omega), math.cos(first * omega),
                  math.sin(second * omega), math.cos(second * omega)]
      got = [table[0, 1 + t, k + j * quarter] for j in range(4)]
      np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_flavour_layouts_follow_the_official_meshgrids():
  # MoCo v3 builds its grid with torch.meshgrid(grid_w, grid_h) ("ij" indexing)
  # and encodes the flattened first output first; MAE uses np.meshgrid(grid_w,
  # grid_h) ("xy" indexing) and encodes grid[0] first. For token t = r * S + c:
  side = 5
  moco_first = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")[0].reshape(-1)
  mae_first = np.meshgrid(np.arange(side), np.arange(side))[0].reshape(-1)
  tokens = np.arange(side * side)
  np.testing.assert_array_equal(moco_first, tokens // side)  # the row
  np.testing.assert_array_equal(mae_first, tokens % side)  # the column
  assert vit_variants.FLAVOUR_POSEMB["moco"][1] == "sincos_rows_first"
  assert vit_variants.FLAVOUR_POSEMB["mae"][1] == "sincos_columns_first"


@pytest.mark.parametrize("flavour, rows_first", [("mae", False), ("moco", True)])
def test_from_scratch_models_start_from_their_sincos_embedding(flavour, rows_first):
  model = vit.VisionTransformer(num_classes=3, variant=f"{flavour}-test/{PATCH}")
  names = flatten(fixtures.param_shapes(model, IMAGE))
  assert POSEMB[flavour] in names
  assert any("encoder_norm" in n for n in names) == (flavour == "moco")
  assert ("fc_norm/scale" in names) == (flavour == "mae")
  init_scheme = vit_variants.FLAVOUR_POSEMB[flavour][1]
  posemb = position_embeddings.AddPositionEmbs(init_scheme).init(
      jax.random.key(0), jnp.zeros((1, 1 + GRID * GRID, D)))["params"]["pos_embedding"]
  np.testing.assert_array_equal(posemb, position_embeddings.sincos_posemb(GRID, D, rows_first))


# --------------------------------------------------------------------------
# Forward against NumPy.


def _apply(model, params, images, rng=None, **kwargs):
  """``model.apply`` under jit (one compile is cheaper than op-by-op dispatch)."""
  rngs = None if rng is None else {"dropout": rng}
  return np.asarray(jax.jit(lambda p, x, r: model.apply({"params": p}, x, rngs=r, **kwargs))(
      params, images, rngs))


def numpy_mae_features(params, images, pool="original"):
  """MAE's forward_features with prompts (KMnP/vpt vit_prompt/vit_mae.py), float64.

  Patch embedding + CLS + position embedding, prompts after CLS (deep: replaced
  before every later block), the blocks, no final norm, then fc_norm of the
  mean over the non-CLS tokens ("original": prompts and patches).
  """
  p = numpy_vit._f64(params)  # pylint: disable=protected-access
  transformer = p["Transformer"]
  x = numpy_vit.patch_embed(np.asarray(images, np.float64), p["embedding"]["kernel"],
                            p["embedding"]["bias"])
  batch = x.shape[0]
  x = np.concatenate([np.broadcast_to(p["cls"], (batch, 1, D)), x], axis=1)
  x = x + transformer["posembed_input"]["pos_embedding"]
  sets = numpy_vit.prompt_sets(p["vpt"]) if "vpt" in p else []
  num_prompts = len(sets[0]) if sets else 0
  if sets:
    x = np.concatenate([x[:, :1], np.broadcast_to(sets[0], (batch,) + sets[0].shape),
                        x[:, 1:]], axis=1)
  for layer in range(DEPTH):
    if layer and len(sets) > 1:
      x = x.copy()
      x[:, 1:1 + num_prompts] = sets[layer]
    x = numpy_vit.encoder_block(x, transformer[f"encoderblock_{layer}"])
  pooled = {"original": x[:, 1:], "img_pool": x[:, 1 + num_prompts:],
            "prompt_pool": x[:, 1:1 + num_prompts]}[pool].mean(axis=1)
  return numpy_vit.layer_norm(pooled, p["fc_norm"]["scale"], p["fc_norm"]["bias"])


@pytest.mark.numerics
@pytest.mark.parametrize("method, pool, skip_dead_work", [
    ("vpt_deep", "original", True), ("vpt_deep", "original", False),
    ("vpt_shallow", "original", True), ("vpt_deep", "img_pool", True),
    ("linear", "original", True)])
def test_mae_features_average_every_token_through_fc_norm(method, pool, skip_dead_work):
  spec = _spec(method, f"mae-test/{PATCH}", pool=pool, skip_dead_work=skip_dead_work)
  model = factory.build_model(spec, 4)
  params = fixtures.make_model_params(model, IMAGE, seed=7)  # fc_norm random too
  images = np.random.default_rng(1).uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
  logits = _apply(model, params, images)
  expected = numpy_mae_features(params, images, pool)
  head = numpy_vit._f64(params["head"])  # pylint: disable=protected-access
  np.testing.assert_allclose(logits, numpy_vit.head_forward(head, expected), **TOLERANCE)


@pytest.mark.numerics
def test_moco_forward_is_cls_after_the_final_norm():
  spec = _spec("vpt_deep", f"moco-test/{PATCH}")
  model = factory.build_model(spec, 4)
  params = fixtures.make_model_params(model, IMAGE, seed=8)
  images = np.random.default_rng(2).uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
  logits = _apply(model, params, images)
  # numpy_vit is the supervised ViT: same math, its posemb under the usual name.
  renamed = flatten(params)
  renamed["Transformer/posembed_input/pos_embedding"] = renamed.pop(POSEMB["moco"])
  np.testing.assert_allclose(logits, numpy_vit.vit_forward(unflatten(renamed), images),
                             **TOLERANCE)


# --------------------------------------------------------------------------
# Methods: trainable sets, training, the fixed MoCo embedding.

# Hand-written: what each method trains on a 2-block model (plus the head).
TRAINED = {
    "linear": (),
    "mlp-3": (),
    "partial-1": (r"Transformer/encoderblock_1/.*", "FINAL_NORM"),
    "bias": (r".*bias",),
    "vpt_shallow": (r"vpt/.*",),
    "vpt_deep": (r"vpt/.*",),
    "adapter": (r"Transformer/encoderblock_\d/adapter/.*",),
    "cvpt": (r"cvpt/.*",),
    "full": (r".*",),
}


@pytest.mark.parametrize("flavour", ["mae", "moco"])
@pytest.mark.parametrize("method", list(TRAINED))
def test_every_vit_method_builds_and_trains_the_right_parameters(flavour, method):
  config = fixtures.method_config(method, f"{flavour}-test/{PATCH}", IMAGE,
                                  **{"adapter.reduction": 4})
  spec = factory.model_spec(config)
  model = factory.build_model(spec, 5)
  # eval_shape traces init, i.e. the whole forward pass, without compiling.
  params = fixtures.param_shapes(model, IMAGE)
  labels = trees.flatten(freezing.label_params(params, factory.trainable_rules(config)))
  final_norm = r"fc_norm/.*" if flavour == "mae" else r"Transformer/encoder_norm/.*"
  patterns = [final_norm if p == "FINAL_NORM" else p for p in TRAINED[method]] + [r"head/.*"]
  for path, label in labels.items():
    expected = any(re.fullmatch(p, path) for p in patterns)
    if path == POSEMB["moco"]:
      expected = False  # fixed for every method
    assert (label == freezing.TRAIN) == expected, (path, label)
  # Each pattern names parameters the model has: a method whose parameters the
  # flavour dropped (no vpt/, adapter/, cvpt/ leaves) would pass the loop above.
  for pattern in patterns:
    assert any(re.fullmatch(pattern, path) for path in labels), pattern


def _train(variant, method, path, num_steps):
  config = fixtures.method_config(method, variant, IMAGE, **{"model.dropout_rate": 0.0})
  spec = factory.model_spec(config)
  model = factory.build_model(spec, 5)
  params = factory.load_pretrained(fixtures.make_model_params(model, IMAGE), spec, path)
  labels = freezing.label_params(params, factory.trainable_rules(config))
  name = registry.get_method(method).optimizer
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, IMAGE, IMAGE, 3), dtype=np.uint8),
           "label": rng.integers(0, 5, (8,)).astype(np.int32)}
  initial, state, losses = train_steps(
      model, params, labels, batch, optimizer=name,
      learning_rate=0.2 if name == "sgd" else 0.01, weight_decay=1e-4,
      normalization=MEAN_STD, num_steps=num_steps)
  return flatten(initial["params"]), flatten(state["params"]), losses


@pytest.mark.parametrize("flavour, filename", [("mae", "mae.pth"), ("moco", "moco.pth.tar")])
def test_vpt_deep_learns_on_each_flavour(flavour, filename, tmp_path):
  path = tmp_path / filename
  write_official_file(flavour, path)
  before, after, losses = _train(f"{flavour}-test/{PATCH}", "vpt_deep", str(path), 4)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  for key, value in before.items():
    changed = not np.array_equal(value, after[key])
    assert changed == key.startswith(("vpt/", "head/")), key


def test_moco_position_embedding_stays_fixed_under_full_fine_tuning(tmp_path):
  path = tmp_path / "moco.pth.tar"
  state = write_official_file("moco", path)
  before, after, losses = _train(f"moco-test/{PATCH}", "full", str(path), 2)
  assert all(np.isfinite(losses))
  np.testing.assert_array_equal(after[POSEMB["moco"]], state["pos_embed"])
  changed = {key for key in before if not np.array_equal(before[key], after[key])}
  assert changed == set(before) - {POSEMB["moco"]}


def test_mae_full_fine_tuning_uses_stochastic_depth_only_when_training_the_backbone():
  params = None
  outputs = {}
  for method in ("full", "vpt_deep"):
    spec = _spec(method, f"mae-test/{PATCH}")
    model = factory.build_model(spec, 4)
    params = fixtures.make_model_params(model, IMAGE, seed=9)
    images = np.ones((4, IMAGE, IMAGE, 3), np.float32)
    outputs[method] = [_apply(model, params, images, jax.random.key(seed), train=True,
                              return_features=True) for seed in (0, 1)]
  # dropout_rate is 0 and there are no prompts with dropout in `full`: only the
  # flavour's drop path (0.1) makes two training passes differ.
  assert not np.allclose(*outputs["full"])
  np.testing.assert_array_equal(*outputs["vpt_deep"])
