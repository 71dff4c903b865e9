"""Optional cross-check of the towers against the reference implementations.

Each test runs only where its reference is installed (torch plus timm,
open_clip, transformers, or facebookresearch/dinov2 on the path) and is
skipped otherwise (CI installs requirements.txt only). A reference model of a
named architecture, with random weights, saves its state dict; the tower loads
that file and both see the same images. The README lists the figures of one
full-size run (max abs difference of the pooled features).
"""

from __future__ import annotations

import numpy as np
import pytest

import tower_fixtures as tw

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _torch():
  return pytest.importorskip("torch")


def _randomised(torch, module):
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for parameter in module.parameters():
      parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
  return module.eval()


def _features(torch, module_call, state_dict, variant, image, tmp_path):
  """(ours, reference) pooled features of the same images."""
  x = tw.images(image)
  with torch.no_grad():
    expected = module_call(torch.tensor(x).permute(0, 3, 1, 2)).numpy()
  path = tmp_path / "reference.pth"
  tw.write_torch({k: v.detach().numpy() for k, v in state_dict.items()}, path)
  model, params = tw.loaded_model("linear", variant, path, image)
  return np.asarray(model.apply({"params": params}, x, return_features=True)), expected


@pytest.mark.numerics
def test_timm_vit(tmp_path):
  torch, timm = _torch(), pytest.importorskip("timm")
  model = _randomised(torch, timm.create_model(
      "vit_small_patch16_224", img_size=32, patch_size=4, embed_dim=16, depth=2, num_heads=2,
      mlp_ratio=2.0))
  call = lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
  ours, expected = _features(torch, call, model.state_dict(), "timm-vit-test4", 32, tmp_path)
  np.testing.assert_allclose(ours, expected, **TOLERANCE)


@pytest.mark.numerics
@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_official(tmp_path, registers):
  torch = _torch()
  vits = pytest.importorskip("dinov2.models.vision_transformer")
  model = _randomised(torch, vits.DinoVisionTransformer(
      img_size=20, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
      init_values=1.0, block_chunks=0, num_register_tokens=4 if registers else 0,
      interpolate_antialias=registers, interpolate_offset=0.0 if registers else 0.1))
  variant = "dinov2-test/4" + ("-reg" if registers else "")
  ours, expected = _features(torch, model, model.state_dict(), variant, 16, tmp_path)
  np.testing.assert_allclose(ours, expected, **TOLERANCE)


@pytest.mark.numerics
def test_open_clip(tmp_path):
  torch, open_clip = _torch(), pytest.importorskip("open_clip")
  model = open_clip.model.CLIP(
      embed_dim=8, vision_cfg=dict(layers=2, width=16, head_width=8, patch_size=4,
                                   image_size=16, mlp_ratio=2.0),
      text_cfg=dict(context_length=4, vocab_size=10, width=16, heads=2, layers=1),
      quick_gelu=True)
  _randomised(torch, model)
  ours, expected = _features(torch, model.encode_image, model.state_dict(), "clip-test/4", 16,
                             tmp_path)
  np.testing.assert_allclose(ours, expected, **TOLERANCE)


@pytest.mark.numerics
def test_transformers_siglip(tmp_path):
  torch = _torch()
  transformers = pytest.importorskip("transformers")
  model = _randomised(torch, transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
      image_size=16, patch_size=4)))
  call = lambda x: model(pixel_values=x).pooler_output
  ours, expected = _features(torch, call, model.state_dict(), "siglip-test/4", 16, tmp_path)
  np.testing.assert_allclose(ours, expected, **TOLERANCE)
