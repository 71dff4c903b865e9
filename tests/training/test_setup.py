"""training/setup: what a run starts from. Here: VPT's class-token prompt init
(prompt.init) is computed from the loaded backbone and the decoded training
split, checked against a NumPy per-class mean of the class tokens."""

from __future__ import annotations

import numpy as np
import pytest

import numpy_vit
import run_fixtures
import tolerances
from vpt_jax import errors
from vpt_jax.training import setup


def _numpy_final_class_token(params, images, norm):
  """The class token leaving the last block (before encoder_norm), float64."""
  params = numpy_vit._f64(params)
  x = (images / 255.0 - np.asarray(norm["mean"])) / np.asarray(norm["std"])
  transformer = params["Transformer"]
  tokens = numpy_vit.patch_embed(x, params["embedding"]["kernel"], params["embedding"]["bias"])
  cls = np.broadcast_to(params["cls"], (len(x), 1, tokens.shape[-1]))
  x = np.concatenate([cls, tokens], axis=1) + transformer["posembed_input"]["pos_embedding"]
  for layer in range(sum(name.startswith("encoderblock_") for name in transformer)):
    x = numpy_vit.encoder_block(x, transformer[f"encoderblock_{layer}"])
  return x[:, 0]


@pytest.mark.numerics
def test_final_cls_init_is_the_per_class_mean_of_the_training_split(backbone, data_dir,
                                                                     tmp_path):
  probe = run_fixtures.tiny_config(backbone, data_dir)
  classes = setup.inputs.load_train_data(probe).num_classes
  config = run_fixtures.tiny_config(backbone, data_dir, **{
      "prompt.init": "final-cls", "prompt.num_prompts": classes})
  run = setup.setup_run(config, str(tmp_path / "run"))
  try:
    params = run.state["params"]
    final = _numpy_final_class_token(params, run.data.images.astype(np.float64), run.norm)
    expected = np.stack([final[run.data.labels == c].mean(0) for c in range(classes)])
    vpt = params["vpt"]
    np.testing.assert_allclose(np.asarray(vpt["shallow"]), expected, **tolerances.FORWARD_VS_NUMPY)
    np.testing.assert_allclose(np.asarray(vpt["deep"]),
                               np.broadcast_to(expected, vpt["deep"].shape),
                               **tolerances.FORWARD_VS_NUMPY)
  finally:
    setup.close(run)


def test_class_token_init_with_the_wrong_prompt_count_is_a_user_error(backbone, data_dir,
                                                                      tmp_path):
  config = run_fixtures.tiny_config(backbone, data_dir, **{
      "prompt.init": "cls-nolastl", "prompt.num_prompts": 1})
  with pytest.raises(errors.UserError, match="one prompt per class"):
    setup.setup_run(config, str(tmp_path / "run"))
