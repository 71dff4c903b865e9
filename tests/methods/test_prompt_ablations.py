"""VPT's ablations (methods/prompt_ablations.py, VptOptions' ablation fields) against
a float64 NumPy transcription of the reference's forwards (KMnP/vpt
``vit_ablations.py``: incorporate_prompt, forward_deep_prompt,
forward_reverse_deep_prompt, forward_noexpand_deep_prompt), written
independently of the schedule; plus closed-form prompt counts and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

import checkpoint_fixtures as fixtures
import numpy_vit
import tolerances
from configs import common
from vpt_jax.methods import factory
from vpt_jax.methods import prompts
from vpt_jax.models import vit

P = 3          # prompts
SIZE = 16      # image size; test4/4: 4 blocks, width 16, 4 x 4 patches
DEPTH, WIDTH, PATCH = 4, 16, 4
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _block(x, transformer, layer):
  return numpy_vit.encoder_block(x, transformer[f"encoderblock_{layer}"])


def _embed(params, images, ablation):
  """The reference's embeddings (with pixel prompts) -> ([CLS, patches] + pos, pixel tokens)."""
  vpt = params.get("vpt", {})
  kernel, bias = params["embedding"]["kernel"], params["embedding"]["bias"]
  batch = images.shape[0]
  if ablation.get("location") == "pad":
    lr = np.broadcast_to((vpt["pad_lr"] - MEAN) / STD, (batch,) + vpt["pad_lr"].shape)
    tb = np.broadcast_to((vpt["pad_tb"] - MEAN) / STD, (batch,) + vpt["pad_tb"].shape)
    images = np.concatenate([lr[:, :, :P], images, lr[:, :, P:]], axis=2)
    images = np.concatenate([tb[:, :P], images, tb[:, P:]], axis=1)
    keep = images.shape[1] // PATCH * PATCH  # torch's strided conv drops the rest
    images = images[:, :keep, :keep]
  if ablation.get("location") == "below":
    channels = np.broadcast_to(vpt["below"], (batch,) + vpt["below"].shape)
    images = np.concatenate([images, channels], axis=-1)
    kernel = np.concatenate([kernel, vpt["below_kernel"]], axis=2)
  tokens = numpy_vit.patch_embed(images, kernel, bias)
  cls = np.broadcast_to(params["cls"], (batch, 1, WIDTH))
  posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
  x = np.concatenate([cls, tokens], axis=1) + posemb
  pixel = None
  if ablation.get("location", "").startswith("prepend-pixel"):
    pixels = vpt["pixels"]
    if ablation["location"].endswith("imgnettransform"):
      pixels = (pixels - MEAN) / STD
    pixel = numpy_vit.patch_embed(pixels[None], params["embedding"]["kernel"], bias)[0]
  return x, pixel


def _with_prompt(x, prompt, location):
  """The reference's deep insertion: replace rows 1..P (prepend) or add."""
  if location == "prepend":
    return np.concatenate([x[:, :1], np.broadcast_to(prompt, (x.shape[0],) + prompt.shape),
                           x[:, 1 + P:]], axis=1)
  return x + prompt  # add (T, D) and add-1 (1, D) broadcast


def reference_tokens(params, images, ablation, deep):
  """encoder_norm of the reference's encoded sequence (B, T, D)."""
  params = numpy_vit._f64(params)
  transformer = params["Transformer"]
  location = ablation.get("location", "prepend")
  x, pixel = _embed(params, np.asarray(images, np.float64), ablation)
  vpt = params.get("vpt", {})
  shallow, deep_sets = vpt.get("shallow"), list(vpt.get("deep", []))
  k = ablation.get("deep_layers") or DEPTH
  if ablation.get("reverse_deep"):  # no incorporate_prompt; the last k blocks
    sets = [shallow] + deep_sets
    for layer in range(DEPTH):
      if layer >= DEPTH - k:
        x = _with_prompt(x, sets[layer - (DEPTH - k)], location)
      x = _block(x, transformer, layer)
  else:
    if pixel is not None:
      x = np.concatenate([x[:, :1], np.broadcast_to(pixel, (x.shape[0],) + pixel.shape),
                          x[:, 1:]], axis=1)
    elif location == "prepend":
      x = np.concatenate([x[:, :1], np.broadcast_to(shallow, (x.shape[0],) + shallow.shape),
                          x[:, 1:]], axis=1)
    elif shallow is not None:
      x = x + shallow
    deep_count = (k - 1) if deep else 0
    for layer in range(DEPTH):
      if 1 <= layer <= deep_count:
        x = _with_prompt(x, shallow if ablation.get("deep_shared") else deep_sets[layer - 1],
                         location)
      elif ablation.get("deep_noexpand") and layer == deep_count + 1:
        x = np.concatenate([x[:, :1], x[:, 1 + P:]], axis=1)
      x = _block(x, transformer, layer)
  norm = transformer["encoder_norm"]
  return numpy_vit.layer_norm(x, norm["scale"], norm["bias"])


def _model(ablation, deep, pool="original", skip=True):
  fields = dict(location=ablation.get("location", "prepend"),
                deep_layers=ablation.get("deep_layers", 0),
                reverse=ablation.get("reverse_deep", False),
                shared=ablation.get("deep_shared", False),
                noexpand=ablation.get("deep_noexpand", False), image_size=SIZE)
  return vit.VisionTransformer(num_classes=4, variant="test4/4", pool=pool,
                               skip_dead_work=skip,
                               hooks=prompts.VptOptions(P, deep=deep, **fields))


CASES = {
    "add": (dict(location="add"), False),
    "add-deep": (dict(location="add"), True),
    "add-1-deep-first-2": (dict(location="add-1", deep_layers=2), True),
    "first-2": (dict(deep_layers=2), True),
    "last-2-reverse": (dict(deep_layers=2, reverse_deep=True), True),
    "add-last-2-reverse": (dict(location="add", deep_layers=3, reverse_deep=True), True),
    "shared": (dict(deep_shared=True), True),
    "shared-first-3": (dict(deep_shared=True, deep_layers=3), True),
    "noexpand-first-2": (dict(deep_noexpand=True, deep_layers=2), True),
    "pad": (dict(location="pad"), False),
    "below": (dict(location="below"), False),
    "prepend-pixel": (dict(location="prepend-pixel"), False),
    "prepend-pixel-gaussian": (dict(location="prepend-pixel-gaussian"), False),
    "prepend-pixel-imgnettransform": (dict(location="prepend-pixel-imgnettransform"), False),
}


# Skipping dead work changes how deep prompts travel (keys and values only): both ways.
SKIP_CASES = [(name, True) for name in sorted(CASES)] + [
    (name, False) for name in ("first-2", "last-2-reverse", "noexpand-first-2", "shared")]


@pytest.mark.numerics
@pytest.mark.parametrize("name, skip", SKIP_CASES)
def test_ablation_matches_the_reference_forward(name, skip):
  ablation, deep = CASES[name]
  model = _model(ablation, deep, skip=skip)
  params = fixtures.random_params(model, image_size=SIZE)
  images = fixtures.uniform_images(image_size=SIZE)
  tokens = reference_tokens(params, images, ablation, deep)
  expected = numpy_vit.head_forward(numpy_vit._f64(params["head"]), tokens[:, 0])
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, images)), expected,
                             **tolerances.FORWARD_VS_NUMPY)


@pytest.mark.numerics
@pytest.mark.parametrize("pool", ["img_pool", "prompt_pool"])
def test_reverse_deep_pools_its_shortened_sequence(pool):
  # The reference's reverse forward overwrites P patch tokens: [CLS, P prompts, N - P patches].
  ablation = dict(deep_layers=2, reverse_deep=True)
  model = _model(ablation, True, pool=pool)
  params = fixtures.random_params(model, image_size=SIZE)
  images = fixtures.uniform_images(image_size=SIZE)
  tokens = reference_tokens(params, images, ablation, True)
  assert tokens.shape[1] == 1 + (SIZE // PATCH) ** 2
  features = numpy_vit.pool(tokens, pool, P)
  np.testing.assert_allclose(
      np.asarray(model.apply({"params": params}, images, return_features=True)), features,
      **tolerances.FORWARD_VS_NUMPY)


def test_pad_with_a_border_the_conv_partly_drops():
  # p = 1 on 16 px: 18 px padded, the stride-4 conv keeps 16 (4 x 4 patches).
  model = vit.VisionTransformer(num_classes=4, variant="test4/4",
                                hooks=prompts.VptOptions(1, location="pad", image_size=SIZE))
  params = fixtures.random_params(model, image_size=SIZE)
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 17, WIDTH)
  assert params["vpt"]["pad_tb"].shape == (2, 18, 3) and params["vpt"]["pad_lr"].shape == (16, 2, 3)


# Trainable prompt parameters in closed form (T = 1 + N = 17 tokens, D = 16, L = 4).
COUNTS = {
    "add": 17 * WIDTH, "add-deep": DEPTH * 17 * WIDTH, "add-1-deep-first-2": 2 * WIDTH,
    "first-2": 2 * P * WIDTH, "last-2-reverse": 2 * P * WIDTH,
    "add-last-2-reverse": 3 * 17 * WIDTH, "shared": P * WIDTH, "shared-first-3": P * WIDTH,
    "noexpand-first-2": 2 * P * WIDTH,
    "pad": 3 * (2 * P * (SIZE + 2 * P) + SIZE * 2 * P),
    "below": SIZE * SIZE * P + PATCH * PATCH * P * WIDTH,
    "prepend-pixel": 3 * PATCH * PATCH * P, "prepend-pixel-gaussian": 3 * PATCH * PATCH * P,
    "prepend-pixel-imgnettransform": 3 * PATCH * PATCH * P,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_prompt_parameter_counts(name):
  ablation, deep = CASES[name]
  shapes = fixtures.param_shapes(_model(ablation, deep), SIZE)
  assert sum(int(np.prod(leaf.shape)) for leaf in _leaves(shapes["vpt"])) == COUNTS[name]


def _leaves(tree):
  for value in tree.values():
    yield from (_leaves(value) if isinstance(value, dict) else [value])


def _config(method="vpt_deep", **prompt):
  config = common.base_config()
  common.apply_method(config, method)
  config.model.variant = "test4/4"
  config.model.image_size = SIZE
  for key, value in prompt.items():
    setattr(config.prompt, key, value)
  return config


def test_spec_section_only_when_set_and_below_trains_the_patch_conv():
  assert "prompt_ablation" not in factory.model_spec(_config())
  spec = factory.model_spec(_config("vpt_shallow", location="below"))
  assert spec["prompt_ablation"] == dict(location="below", deep_layers=0, reverse_deep=False,
                                         deep_shared=False, deep_noexpand=False, init="random")
  rules = factory.trainable_rules(_config("vpt_shallow", location="below"))
  assert (r"embedding/(kernel|bias)", "train") in rules
  assert rules.index((r"embedding/(kernel|bias)", "train")) < rules.index((r".*", "frozen"))


@pytest.mark.parametrize("method, prompt, message", [
    ("vpt_deep", dict(location="middle"), "Unknown prompt.location"),
    ("vpt_deep", dict(location="pad"), "shallow only"),
    ("vpt_shallow", dict(deep_layers=2), "shape deep prompts"),
    ("vpt_deep", dict(deep_layers=5), r"lie in \[0, 4\]"),
    ("vpt_deep", dict(reverse_deep=True), "needs prompt.deep_layers"),
    ("vpt_deep", dict(deep_shared=True, deep_noexpand=True, deep_layers=2), "exclude each other"),
    ("vpt_deep", dict(deep_noexpand=True), r"deep_layers=k in \[1, 3\]"),
    ("vpt_deep", dict(location="add", pool="img_pool"), "reads prepended prompts"),
    ("vpt_shallow", dict(location="pad", projection=8), "set prompt.projection=-1"),
    ("vpt_deep", dict(init="final-cls", deep_layers=2), "location=prepend, deep_layers=0"),
    ("vpt_deep", dict(init="mean"), "Unknown prompt.init"),
    ("e2vpt", dict(deep_shared=True), "use them with vpt_shallow"),
])
def test_invalid_combinations_are_refused_in_one_line(method, prompt, message):
  with pytest.raises(ValueError, match=message) as failure:
    factory.validate_spec(factory.model_spec(_config(method, **prompt)))
  assert "\n" not in str(failure.value)
