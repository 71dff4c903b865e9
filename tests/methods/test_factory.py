"""The model spec (what an export's task.json holds) of every registered method, pinned.

The expected specs are written out by hand: a change in how a method's config
section becomes its spec section (``Method.read_settings``) or in the shared
fields shows up here before it breaks exports written earlier.
"""

from __future__ import annotations

import json

import pytest

import checkpoint_fixtures as fixtures
from vpt_jax import errors
from vpt_jax.methods import factory
from vpt_jax.methods import registry

# Non-default settings, so every value must come from its own section.
OVERRIDES = {
    "prompt.dropout": 0.25, "prompt.projection": -1, "prompt.pool": "original",
    "adapter.reduction": 4, "adapter.init": "vpt_reference",
    "lora.rank": 2, "lora.alpha": 3, "lora.targets": "query, out",
    "cvpt.insert": 2, "cvpt.drop_path": 0.2,
    "vfpt.percentage": 0.75, "vfpt.dimension": "hidden",
    "e2vpt.kv_prompts": 3, "e2vpt.kv_dropout": 0.5,
    "sidetune.widths": "4, 8",
    "mlp.dropout": 0.3,
    "houlsby.bottleneck": 4, "houlsby.scale": 0.5, "houlsby.dropout": 0.2,
    "houlsby.backbone_drop_path": 0.3, "adaptformer.backbone_drop_path": 0.1,
    "adapter_plus.backbone_drop_path": 0.2, "convpass.backbone_drop_path": 0.4,
    "adaptformer.bottleneck": 4, "adaptformer.scale": 0.2, "adaptformer.norm": "out",
    "adaptformer.dropout": 0.3,
    "adapter_plus.bottleneck": 2, "adapter_plus.drop_path": 0.2,
    "convpass.bottleneck": 4, "convpass.scale": 10, "convpass.conv_init": "xavier",
    "convpass.dropout": 0.2,
    "ssf.drop_path": 0.2, "difffit.drop_path": 0.2, "ln_tune.drop_path": 0.2,
    "fact.rank": 4, "fact.scale": 10.0, "fact.dropout": 0.2, "fact.drop_path": 0.2,
    "repadapter.dim": 4, "repadapter.groups": 2, "repadapter.scale": 5.0,
    "repadapter.dropout": 0.2, "repadapter.drop_path": 0.2,
    "vqt.num_queries": 2, "vqt.dropout": 0.2, "vqt.combine": "weighted_sum",
}


def _shared(method: str, **fields) -> dict:
  """The fields every spec has, as model_spec writes them for a method without prompts."""
  spec = {"method": method, "variant": "test4/4", "image_size": 16, "dropout_rate": 0.1,
          "skip_dead_work": True, "dtype": "float32", "remat": "none", "num_prompts": 0,
          "prompt_dropout": 0.0, "prompt_projection": -1, "pool": "original"}
  spec.update(fields)
  return spec


PROMPTED = dict(num_prompts=4, prompt_dropout=0.25, prompt_projection=-1)
EXPECTED = {
    "linear": _shared("linear"),
    "full": _shared("full"),
    "bias": _shared("bias"),
    "partial-1": _shared("partial-1"),
    "partial-2": _shared("partial-2"),
    "partial-4": _shared("partial-4"),
    "mlp-2": _shared("mlp-2", mlp={"dropout": 0.3}),
    "mlp-3": _shared("mlp-3", mlp={"dropout": 0.3}),
    "mlp-5": _shared("mlp-5", mlp={"dropout": 0.3}),
    "mlp-9": _shared("mlp-9", mlp={"dropout": 0.3}),
    "adapter": _shared("adapter", adapter={"reduction": 4, "init": "vpt_reference"}),
    "lora": _shared("lora", lora={"rank": 2, "alpha": 3.0, "targets": ["query", "out"]}),
    "sidetune": _shared("sidetune", sidetune={"widths": [4, 8]}),
    "cvpt": _shared("cvpt", cvpt={"num_prompts": 4, "insert": 2, "dropout": 0.25,
                                  "drop_path": 0.2}),
    "vpt_shallow": _shared("vpt_shallow", **PROMPTED),
    "vpt_deep": _shared("vpt_deep", **PROMPTED),
    "vpt+bias": _shared("vpt+bias", **PROMPTED),
    "vfpt": _shared("vfpt", **PROMPTED, vfpt={"percentage": 0.75, "dimension": "hidden"}),
    "e2vpt": _shared("e2vpt", **PROMPTED, e2vpt={"num_prompts": 3, "dropout": 0.5}),
    "houlsby": _shared("houlsby", houlsby={"bottleneck": 4, "scale": 0.5, "dropout": 0.2,
                                           "backbone_drop_path": 0.3}),
    "adaptformer": _shared("adaptformer", adaptformer={"bottleneck": 4, "scale": 0.2,
                                                       "norm": "out", "dropout": 0.3,
                                                       "backbone_drop_path": 0.1}),
    "adapter_plus": _shared("adapter_plus", adapter_plus={"bottleneck": 2, "drop_path": 0.2,
                                                          "backbone_drop_path": 0.2}),
    "convpass": _shared("convpass", convpass={"bottleneck": 4, "scale": 10.0,
                                              "conv_init": "xavier", "dropout": 0.2,
                                              "backbone_drop_path": 0.4}),
    "ssf": _shared("ssf", ssf={"drop_path": 0.2}),
    "difffit": _shared("difffit", difffit={"drop_path": 0.2}),
    "ln_tune": _shared("ln_tune", ln_tune={"drop_path": 0.2}),
    **{m: _shared(m, fact={"rank": 4, "scale": 10.0, "dropout": 0.2, "drop_path": 0.2})
       for m in ("fact_tt", "fact_tk")},
    "repadapter": _shared("repadapter", repadapter={"dim": 4, "groups": 2, "scale": 5.0,
                                                    "dropout": 0.2, "drop_path": 0.2}),
    "vqt": _shared("vqt", vqt={"num_queries": 2, "dropout": 0.2, "combine": "weighted_sum"}),
}


def test_every_registered_method_has_a_pinned_spec():
  assert sorted(EXPECTED) == sorted(registry.METHODS)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_spec_is_byte_for_byte_the_pinned_one(method):
  config = fixtures.method_config(method, "test4/4", 16, num_prompts=4, **OVERRIDES)
  spec = factory.model_spec(config)
  # task.json is written with sorted keys: equal dumps mean equal files, and
  # the dump tells 3 from 3.0.
  assert json.dumps(spec, sort_keys=True) == json.dumps(EXPECTED[method], sort_keys=True)
  assert factory.model_spec(spec) == spec  # a spec passes through unchanged
  factory.validate_spec(spec)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_spec_round_trips_through_json_to_the_same_model(method):
  config = fixtures.method_config(method, "test4/4", 16, num_prompts=4, **OVERRIDES)
  spec = factory.model_spec(config)
  # JSON turns the tuples of hook objects into lists; the model must not change.
  assert factory.build_model(json.loads(json.dumps(spec)), 5) == factory.build_model(spec, 5)
  hash(factory.build_model(json.loads(json.dumps(spec)), 5).hooks)  # hashable for nn.remat


# VPT's prompt ablations (methods/prompt_ablations.py): a section only when set.
ABLATION_OVERRIDES = {"prompt.location": "add-1", "prompt.deep_layers": 3,
                      "prompt.reverse_deep": True, "prompt.init": "random"}
ABLATION_EXPECTED = _shared(
    "vpt_deep", **PROMPTED, prompt_ablation={
        "location": "add-1", "deep_layers": 3, "reverse_deep": True, "deep_shared": False,
        "deep_noexpand": False, "init": "random"})


def test_prompt_ablation_spec_is_pinned_and_round_trips():
  config = fixtures.method_config("vpt_deep", "test4/4", 16, num_prompts=4,
                                  **OVERRIDES, **ABLATION_OVERRIDES)
  spec = factory.model_spec(config)
  assert json.dumps(spec, sort_keys=True) == json.dumps(ABLATION_EXPECTED, sort_keys=True)
  factory.validate_spec(spec)
  assert factory.build_model(json.loads(json.dumps(spec)), 5) == factory.build_model(spec, 5)


def test_image_size_zero_is_named_as_such_not_as_a_patch_mismatch():
  config = fixtures.method_config("vpt_deep", "test4/4", 16, num_prompts=4)
  spec = {**factory.model_spec(config), "image_size": 0}
  with pytest.raises(errors.UserError, match=r"^model.image_size=0 must be a positive number "
                                             r"of pixels; set --config.model.image_size="):
    factory.validate_spec(spec)


def test_a_partial_init_draws_exactly_the_kept_leaves_of_a_full_init():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = fixtures.method_config("vpt_deep", "test4/4", 16, num_prompts=4, **OVERRIDES)
  model = factory.build_model(factory.model_spec(config), 5)
  full = factory.init_variables(model, 16, seed=3)["params"]
  # Keep the prompts and the head (what a pretrained run draws), drop the backbone.
  keep = {name: name in ("head", "vpt") for name in full}
  assert sorted(full) == ["Transformer", "cls", "embedding", "head", "vpt"]
  keep_params = {name: jax.tree.map(lambda _, kept=kept: kept, full[name])
                 for name, kept in keep.items()}
  partial = factory.init_variables(model, 16, seed=3, keep_params=keep_params)["params"]
  for name, kept in keep.items():
    if kept:
      jax.tree.map(np.testing.assert_array_equal, partial[name], full[name])
    else:
      assert all(leaf is None for leaf in jax.tree.leaves(partial[name], is_leaf=lambda x: x is None))
