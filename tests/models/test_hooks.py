"""The backbone's hook points (models/hooks.py): defaults, naming and a plug-in's reach."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import tolerances
from vpt_jax.methods import factory
from vpt_jax.methods import registry
from vpt_jax.models import hooks
from vpt_jax.models import vit
from vpt_jax.params import trees

HOOK_NAMES = {name for name, value in vars(hooks.Hooks).items()
              if callable(value) and not name.startswith("_")}
BASE = dict(num_classes=3, variant="test/4")
TOLERANCE = tolerances.FORWARD_VS_NUMPY  # two float32 programs of the same math


@dataclasses.dataclass(frozen=True)
class ScaledMlp(hooks.Hooks):
  """A method written only against the hook protocol: a learned scale on the MLP branch."""
  init: float = 2.0

  def mlp_branch(self, branch, block):
    scale = ScaleParam(self.init, name="scaled_mlp")()
    return branch * scale.astype(block.dtype)


class ScaleParam(nn.Module):
  init: float

  @nn.compact
  def __call__(self):
    return self.param("scale", nn.initializers.constant(self.init), ())


def _images():
  return np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_no_hook_object_field_hides_a_hook(method):
  config = fixtures.method_config(method, "test/4", 16)
  hook_object = registry.get_method(method).hooks(factory.model_spec(config))
  assert isinstance(hook_object, hooks.Hooks)
  hash(hook_object)  # module attributes stay hashable
  fields = {field.name for field in dataclasses.fields(hook_object)}
  assert not fields & HOOK_NAMES, fields & HOOK_NAMES


def test_the_default_hooks_change_nothing():
  assert vit.VisionTransformer(**BASE) == vit.VisionTransformer(**BASE, hooks=hooks.Hooks())
  assert hooks.NO_HOOKS.prompt_tokens() == 0 and not hooks.NO_HOOKS.reads_images


def test_a_block_hook_binds_its_parameters_to_the_calling_block():
  model = vit.VisionTransformer(**BASE, hooks=ScaledMlp())
  names = set(trees.flatten(fixtures.param_shapes(model, 16)))
  plain = set(trees.flatten(fixtures.param_shapes(vit.VisionTransformer(**BASE), 16)))
  assert names - plain == {f"Transformer/encoderblock_{i}/scaled_mlp/scale" for i in range(2)}


def test_a_block_hook_runs_under_remat_with_the_same_values_and_gradients():
  images = _images()
  outputs = []
  for remat in ("none", "block"):
    model = vit.VisionTransformer(**BASE, hooks=ScaledMlp(), remat=remat)
    params = fixtures.randomize(fixtures.param_shapes(model, 16), 3)
    loss = lambda p: model.apply({"params": p}, images).sum()  # pylint: disable=cell-var-from-loop
    outputs.append((loss(params), jax.grad(loss)(params)))
  np.testing.assert_allclose(outputs[0][0], outputs[1][0], **TOLERANCE)
  for path, grad in trees.flatten(outputs[0][1]).items():
    np.testing.assert_allclose(grad, trees.flatten(outputs[1][1])[path], err_msg=path,
                               **TOLERANCE)


def test_the_mlp_hook_changes_the_output():
  images = _images()
  model = vit.VisionTransformer(**BASE, hooks=ScaledMlp(init=1.0))
  params = fixtures.randomize(fixtures.param_shapes(model, 16), 3)
  flat = trees.flatten(params)
  ones = trees.unflatten({p: (jnp.ones_like(v) if p.endswith("scaled_mlp/scale") else v)
                          for p, v in flat.items()})
  plain = trees.unflatten({p: v for p, v in flat.items() if "scaled_mlp" not in p})
  np.testing.assert_allclose(
      model.apply({"params": ones}, images),
      vit.VisionTransformer(**BASE).apply({"params": plain}, images), **TOLERANCE)
  doubled = trees.unflatten({p: (2 * jnp.ones_like(v) if p.endswith("scaled_mlp/scale") else v)
                             for p, v in flat.items()})
  assert not np.allclose(model.apply({"params": doubled}, images),
                         model.apply({"params": ones}, images), **TOLERANCE)
