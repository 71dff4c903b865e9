"""The ResNet's frozen (inference) BatchNorm; the forward is checked against NumPy in
test_convnet_family.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.models import resnet


def test_frozen_batch_norm_is_inference_batch_norm_without_statistic_gradients():
  """Independent of any trainable rule: d loss / d (mean, var) is exactly zero."""
  rng = np.random.default_rng(0)
  params = {"scale": rng.uniform(0.5, 1.5, 4), "bias": rng.normal(0, 1, 4),
            "mean": rng.normal(0, 1, 4), "var": rng.uniform(0.5, 1.5, 4)}
  params = {k: v.astype(np.float32) for k, v in params.items()}
  x = rng.normal(0, 1, (2, 3, 3, 4)).astype(np.float32)
  norm = resnet.FrozenBatchNorm()
  expected = ((x - params["mean"]) / np.sqrt(params["var"] + 1e-5) * params["scale"]
              + params["bias"])
  np.testing.assert_allclose(norm.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(norm.apply({"params": p}, x) ** 2))(params)
  assert not np.any(grads["mean"]) and not np.any(grads["var"])
  assert np.all(grads["scale"] != 0) and np.all(grads["bias"] != 0)
