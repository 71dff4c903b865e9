"""Normalising uint8 images on the device, without TensorFlow."""

import os
import subprocess
import sys

import numpy as np

from vpt_jax.data import normalization as normalization_lib


def test_normalize_images_by_hand():
  images = np.array([[0, 255, 51]], np.uint8)  # one pixel, three channels
  out = normalization_lib.normalize_images(images, *normalization_lib.MINUS_ONE_TO_ONE)
  assert out.dtype == np.float32
  np.testing.assert_allclose(np.asarray(out), [[-1.0, 1.0, -0.6]], atol=1e-6)
  out = normalization_lib.normalize_images(images, normalization_lib.IMAGENET_MEAN,
                                           normalization_lib.IMAGENET_STD)
  np.testing.assert_allclose(
      np.asarray(out),
      [[-0.485 / 0.229, (1.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]], rtol=1e-5)


def test_normalization_imports_no_tensorflow():
  """Models, exports and benchmarks normalise without loading TensorFlow (its
  import would raise the benchmarks' peak-RSS figures)."""
  code = ("import sys; import vpt_jax.data.normalization; "
          "assert 'tensorflow' not in sys.modules")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)
