"""Head-only methods train on backbone features computed once: same results as
running the frozen backbone every step, through the whole main job."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
import checkpoint_fixtures
from vpt_jax.checkpoints import train_state as ckpt_lib
from run_fixtures import tiny_config
from vpt_jax.data import normalization as normalization_lib
from vpt_jax.export import task_export
from vpt_jax.methods import factory
from vpt_jax.models import vit
from vpt_jax.training import mesh as mesh_lib
from vpt_jax.params import freezing
from vpt_jax.params import trees
from vpt_jax.training import feature_cache
from vpt_jax.training import trainer


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
  model = vit.VisionTransformer(num_classes=7, variant="test/4")
  params = checkpoint_fixtures.randomize(checkpoint_fixtures.param_shapes(model, 32), seed=2,
                                         scale=0.1)
  path = str(tmp_path_factory.mktemp("backbone") / "ViT-test_4.npz")
  checkpoint_fixtures.write_vit_raw_npz(params, path)
  return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.numerics
def test_cached_features_give_the_uncached_result(backbone, data_dir, tmp_path, monkeypatch):
  # mlp-2: a BatchNorm hidden layer and dropout, so the cached path must also
  # reproduce the head's train-mode randomness and running averages.
  overrides = {"method": "mlp-2", "optim.base_lr": 0.5}
  extracted = []
  compute_features = feature_cache.compute_features

  def counting_compute_features(*args, **kwargs):
    extracted.append(compute_features(*args, **kwargs))
    return extracted[-1]
  monkeypatch.setattr(feature_cache, "compute_features", counting_compute_features)
  runs = {}
  for cache in (True, False):
    workdir = str(tmp_path / f"cache_{cache}")
    results = trainer.train_and_evaluate(
        tiny_config(backbone, data_dir, cache_features=cache, **overrides), workdir)
    runs[cache] = (results, task_export.read_export(results["export"])[1])
  assert len(extracted) == 1 and extracted[0].shape[1] == 16  # only the cached run
  (cached, cached_params), (plain, plain_params) = runs[True], runs[False]
  assert sorted(cached_params) == sorted(plain_params)
  assert any(k.startswith("batch_stats/") for k in cached_params)
  # The same computation up to float rounding: XLA fuses the backbone inside the
  # train step differently from the standalone extraction (the features agree
  # to ~1 ulp, see the next test); 9 steps through BatchNorm on batches of 8
  # amplify that to ~1e-4.
  for path in plain_params:
    np.testing.assert_allclose(cached_params[path], plain_params[path], rtol=1e-3, atol=3e-4,
                               err_msg=path)
  # Rounding can flip the argmax of a near-tie only (10 test images).
  assert abs(cached["test"]["top1"] - plain["test"]["top1"]) <= tolerances.one_example(
      plain["test"]["count"])
  np.testing.assert_allclose(cached["test"]["loss"], plain["test"]["loss"], rtol=1e-3)


def test_checkpoints_carry_the_batch_norm_running_averages(tmp_path):
  state = {"step": jnp.array(3, jnp.int32),
           "params": {"head": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
                      "cls": jnp.ones(2)},
           "opt_state": {"mu": jnp.full((2,), 0.5)},
           "batch_stats": {"head": {"batchnorm_0": {"mean": jnp.arange(2.0),
                                                    "var": jnp.full((2,), 4.0)}}}}
  labels = {"head": {"kernel": "train", "bias": "train"}, "cls": "frozen"}
  manager = ckpt_lib.open_manager(str(tmp_path / "checkpoints"), keep=1, every_steps=1)
  ckpt_lib.save(manager, state, labels)
  manager.wait_until_finished()
  empty = jax.tree.map(jnp.zeros_like, state)
  restored = ckpt_lib.restore_latest(manager, {**empty, "params": state["params"]}, labels)
  manager.close()
  for path, value in trees.flatten(state).items():
    np.testing.assert_array_equal(trees.flatten(restored)[path], value, err_msg=path)


def test_only_head_only_methods_use_the_cache(backbone, data_dir):
  def uses_cache(method, **overrides):
    config = tiny_config(backbone, data_dir, method=method, **overrides)
    shapes = checkpoint_fixtures.param_shapes(
        factory.build_model(factory.model_spec(config), 3), 32)
    labels = freezing.label_params(shapes, factory.trainable_rules(config))
    return feature_cache.uses_cached_features(config, labels)

  assert uses_cache("linear") and uses_cache("mlp-3")
  assert not uses_cache("linear", cache_features=False)
  for method in ("vpt_deep", "full", "partial-1", "bias", "adapter", "sidetune", "cvpt"):
    assert not uses_cache(method), method


@pytest.mark.numerics
def test_extracted_features_equal_the_train_mode_features():
  model = vit.VisionTransformer(num_classes=3, variant="test/4", head_hidden_layers=1)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = checkpoint_fixtures.randomize(shapes, seed=2)
  images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
  norm = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
  cached = feature_cache.compute_features(model, variables, images, mesh_lib.make_data_mesh(),
                                          batch_size=4, norm=norm)  # 3 batches, the last padded
  assert cached.shape == (10, 16)
  # What the uncached train step computes: train mode, under a gradient.
  def features(params, x):
    out, _ = model.apply({**variables, "params": params}, x, train=True,
                         rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"],
                         return_features=True)
    return out.sum(), out
  _, uncached = jax.jit(jax.grad(features, has_aux=True))(
      variables["params"], normalization_lib.normalize_images(images, **norm))
  # Two programs fuse the backbone differently: 4 blocks of sums at most 65
  # tokens long (attention over 1 + 64 patches), 4 chained sums per block.
  atol = tolerances.rounding_atol(np.max(np.abs(uncached)), reduction_length=65, steps=4 * 4)
  np.testing.assert_allclose(cached, np.asarray(uncached), rtol=0, atol=atol)
