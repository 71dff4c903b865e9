"""Parameter counts against the VPT reference's logs (vpt.md 1.1, 6)."""

import jax
import jax.numpy as jnp
import pytest

from vpt_jax.methods import prompts
from vpt_jax.models import vit
from vpt_jax.params import trees


def _shapes(**kwargs):
  model = vit.VisionTransformer(**kwargs)
  return trees.flatten(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))["params"])


def _count(flat, prefixes=None):
  return sum(int(jnp.prod(jnp.array(v.shape))) for p, v in flat.items()
             if prefixes is None or p.startswith(prefixes))


@pytest.mark.parametrize("num_prompts, num_classes, trainable, total", [
    (100, 6, 926_214, 86_724_870),   # the demo's DMLab run
    (5, 397, 351_373, 86_150_029),   # the demo's SUN397 run
])
def test_vpt_deep_b16_counts_equal_the_reference(num_prompts, num_classes, trainable, total):
  flat = _shapes(num_classes=num_classes, variant="B/16",
                 hooks=prompts.VptOptions(num_prompts, deep=True))
  assert _count(flat, ("vpt/", "head/")) == trainable
  assert _count(flat) == total


def test_b16_backbone_has_the_reference_size():
  flat = _shapes(num_classes=1, variant="B/16")
  assert _count(flat) - _count(flat, ("head/",)) == 85_798_656


def test_vpt_shallow_trains_one_prompt_set():
  flat = _shapes(num_classes=10, variant="B/16", hooks=prompts.VptOptions(50))
  assert _count(flat, ("vpt/",)) == 50 * 768
