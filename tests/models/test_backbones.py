"""Every backbone family through the real job: load a backbone file, prompt-tune,
evaluate, export, and rebuild the trained model from backbone file + export."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
from run_fixtures import tiny_config
from vpt_jax.checkpoints import npz
from vpt_jax.params.trees import flatten
from vpt_jax.export import task_export
from vpt_jax.models import backbones
from vpt_jax.methods import factory
from vpt_jax.training import trainer

# (variant, image size, method): the tiny member of each non-ViT family with
# the prompt method the paper defines for it.
FAMILY_CASES = [
    ("swin-test/4w2", 32, "vpt_deep"),
    ("resnet-test", 32, "vpt_shallow"),
    ("convnext-test", 32, "vpt_shallow"),
]


def _config(variant, image_size, method, backbone_path, data_dir):
  """test_end_to_end's tiny job on this backbone: 2 epochs, no validation split."""
  return tiny_config(backbone_path, data_dir, method=method, **{
      "model.variant": variant, "model.image_size": image_size, "prompt.dropout": 0.0,
      "data.eval_split": "", "optim.epochs": 2, "optim.warmup_epochs": 0})


@pytest.mark.parametrize("variant,image_size,method", FAMILY_CASES)
def test_family_trains_exports_and_reloads(variant, image_size, method, tmp_path):
  # A "pretrained" backbone: a random init saved in the model's own layout,
  # so every loaded value is known and differs from a fresh init.
  spec = factory.model_spec(_config(variant, image_size, method, "", str(tmp_path)))
  model = factory.build_model(spec, 6)
  pretrained = flatten(factory.init_variables(model, image_size, seed=123)["params"])
  backbone_file = str(tmp_path / "backbone.npz")
  npz.save_npz({k: np.asarray(v) for k, v in pretrained.items()
                if not k.startswith(("head/", "vpt/"))}, backbone_file)

  config = _config(variant, image_size, method, backbone_file, str(tmp_path / "tfds"))
  results = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["test"]["count"] == 10
  assert backbones.family_name(variant) in ("swin", "resnet", "convnext")

  reloaded_model, params, metadata = task_export.load_task(results["export"])
  assert metadata["model"]["variant"] == variant
  _, exported = task_export.read_export(results["export"])
  assert exported and all(k.startswith(("head/", "vpt/")) for k in exported)
  flat = flatten(params)
  for path, value in flat.items():
    expected = exported[path] if path in exported else pretrained[path]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=path)
  # The prompts trained away from their initialisation.
  initial = flatten(factory.init_variables(model, image_size, seed=config.seed)["params"])
  assert any(not np.array_equal(exported[k], np.asarray(initial[k]))
             for k in exported if k.startswith("vpt/"))
  images = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  num_classes = exported["head/bias"].shape[0]  # the dataset's count classes
  assert reloaded_model.apply({"params": params}, images).shape == (2, num_classes)
  with open(os.path.join(str(tmp_path / "run"), "results.json")) as f:
    assert json.load(f)["trainable_params"] == sum(v.size for v in exported.values())


@pytest.mark.parametrize("variant", ["swin-test/4w2", "resnet-test", "convnext-test"])
def test_remat_is_refused_where_the_family_does_not_implement_it(variant):
  config = fixtures.method_config("linear", variant, 32, **{"model.remat": "block"})
  with pytest.raises(ValueError, match="model.remat='block' is not implemented for"):
    factory.validate_spec(factory.model_spec(config))
