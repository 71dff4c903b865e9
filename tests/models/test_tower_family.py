"""tower_family: every method on the DINOv2 / CLIP / SigLIP towers, and the exact
dead-work shortcuts with prompts after CLS + registers (DINOv2) or before the
patches (SigLIP)."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_fixtures
import tower_fixtures as tw
from vpt_jax import errors
from vpt_jax.methods import factory
from vpt_jax.models import tower_family
from vpt_jax.params import freezing
from vpt_jax.params.trees import flatten

# CLIP places prompts as the plain ViT (after CLS): its shortcuts are test_vit's.
TOWERS = ("dinov2-test/4-reg", "siglip-test/4")


def _model(method, variant, **overrides):
  config = checkpoint_fixtures.method_config(method, variant, 16, num_prompts=2)
  spec = dict(factory.model_spec(config), dropout_rate=0.0, **overrides)
  model = factory.build_model(spec, num_classes=3)
  return model, factory.init_variables(model, 16, seed=2)


@pytest.mark.parametrize("variant", TOWERS)
def test_deep_prompt_shortcuts_are_exact(variant):
  """skip_dead_work (CLS-only last block, key/value-only deep prompts) changes nothing."""
  fast, variables = _model("vpt_deep", variant, skip_dead_work=True)
  slow, _ = _model("vpt_deep", variant, skip_dead_work=False)
  x = tw.images(16)
  np.testing.assert_allclose(fast.apply(variables, x), slow.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


# The methods that reach into the blocks through hooks (bias, full, partial-k and
# linear only choose what trains; the prompt methods run in the tests above).
# (adapter and CVPT use block hooks that see rows only, as on every ViT.)
@pytest.mark.parametrize("method", ["lora", "e2vpt"])
def test_hook_methods_run_on_siglip(method):
  model, variables = _model(method, "siglip-test/4")
  logits = model.apply(variables, tw.images(16))
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))


def test_partial_k_trains_what_follows_the_blocks():
  config = checkpoint_fixtures.method_config("partial-1", "siglip-test/4", 16)
  model = factory.build_model(factory.model_spec(config), num_classes=3)
  params = factory.variable_shapes(model, 16)["params"]
  labels = flatten(freezing.label_params(params, factory.trainable_rules(config)))
  trainable = {key for key, label in labels.items() if label != freezing.FROZEN}
  assert "MAPHead_0/probe" in trainable and "Transformer/encoder_norm/scale" in trainable
  assert "Transformer/encoderblock_1/LayerNorm_0/scale" in trainable
  assert "Transformer/encoderblock_0/LayerNorm_0/scale" not in trainable


@pytest.mark.parametrize("method", ["ssf", "fact_tt"])
def test_swiglu_towers_refuse_methods_that_change_the_mlp_dense_layers(method):
  config = checkpoint_fixtures.method_config(method, "dinov2-testg/4", 16)
  with pytest.raises(errors.UserError, match=rf"^method '{method}' changes the MLP's two Dense "):
    factory.validate_spec(factory.model_spec(config))
  # The same method on the GELU MLP is accepted.
  factory.validate_spec(factory.model_spec(
      checkpoint_fixtures.method_config(method, "dinov2-test/4", 16)))


def test_unknown_variants_name_the_forms():
  with pytest.raises(ValueError, match=r"dinov2-<S\|B\|L\|g>/14\[-reg\]"):
    tower_family.parse_variant("dinov2-Q/14", "dinov2-", "-reg", "dinov2-<S|B|L|g>/14[-reg]")
  with pytest.raises(errors.UserError, match="prompt.pool=original"):
    factory.validate_spec(tw.tower_spec("vpt_shallow", "siglip-test/4", 16, pool="prompt_pool"))


def test_tower_state_takes_the_prefixed_tower_or_prefixes_a_bare_one():
  two_towers = {"visual.conv1.weight": 1, "visual.proj": 2, "token_embedding.weight": 3}
  assert tower_family.tower_state(two_towers, "visual.", "conv1.weight") == {
      "visual.conv1.weight": 1, "visual.proj": 2}
  bare = {"conv1.weight": 1, "proj": 2}
  assert tower_family.tower_state(bare, "visual.", "conv1.weight") == {
      "visual.conv1.weight": 1, "visual.proj": 2}
  # Neither the prefix nor the bare tower's key: nothing (the layout check names what is missing).
  assert tower_family.tower_state({"token_embedding.weight": 3}, "visual.", "conv1.weight") == {}
