"""Tolerances for comparing two float32 computations of the same quantity.

Two programs that compute the same float32 value may still add its terms in
different orders: XLA:CPU chooses its matmul and reduction kernels by the
instruction set (SSE4.2, AVX2, AVX-512) and by more than that, ``vmap`` turns
per-setting matmuls into batched ones, sharding splits a sum into partial sums,
remat and feature caching fuse differently. Results then differ in the last
bits, and by how much depends on the CPU. A comparison between two such paths
must therefore allow what rounding can do, and no more:

* A sum of n float32 terms computed in two orders differs by at most about
  ``n * eps * max|term|`` (each order is within ``(n - 1) * eps/2 * sum|term|``
  of the exact sum, Higham, "Accuracy and Stability of Numerical Algorithms",
  eq. 4.4; the worst case is rare, but unlike the typical ``sqrt(n)`` it holds
  on every CPU).
* A quantity produced by ``steps`` such reductions in a chain (layers of a
  forward pass, optimizer steps) accumulates at most ``steps`` times that, to
  first order.

So ``rounding_atol(magnitude, n, steps)`` is the bound to put next to an
assertion, with ``magnitude`` the scale of what is being summed (the largest
update for trained parameters, the largest activation for logits). A defect
(a wrong learning rate, a mask dropped, another setting's statistics) changes
the compared values by about ``magnitude`` itself, far above the bound.
"""

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7


def rounding_atol(magnitude: float, reduction_length: int, steps: int = 1) -> float:
  """eps * reduction_length * steps * magnitude: what reordered float32 sums can change."""
  return FLOAT32_EPS * reduction_length * steps * float(magnitude)


def largest_change(before: dict, after: dict) -> float:
  """max |after - before| over the shared leaves of two flat {path: array} trees."""
  return max(float(np.max(np.abs(np.asarray(after[path], np.float64)
                                 - np.asarray(before[path], np.float64))))
             for path in after)


def largest_magnitude(values: dict) -> float:
  """max |value| over every leaf of a flat {path: array} tree."""
  return max(float(np.max(np.abs(np.asarray(v, np.float64)))) for v in values.values())


def one_example(num_examples: int) -> float:
  """The accuracy one example is worth.

  Two paths whose parameters differ by rounding can flip an argmax only where an
  example's two largest logits are that close; on a handful of test examples at
  most one such tie is allowed (more means the parameters really differ).
  """
  return 1.0 / num_examples + 1e-12


# A float32 forward of the tests' tiny ViTs against a float64 NumPy forward of
# the same weights: one float32 path is within half the two-path bound of the
# exact value, eps/2 * n * steps * magnitude, with sums at most ~70 long (1 +
# prompts + 64 patches at 32 px), 4 chained sums per block, at most 4 blocks,
# activations O(1) after LayerNorm: 0.6e-7 * 70 * 16 ~ 6.7e-5 < 1e-4.
FORWARD_VS_NUMPY = dict(rtol=1e-4, atol=1e-4)


def bf16_attention_atol(largest_logit: float, largest_value: float) -> float:
  """What bfloat16 rounding can change in one attention, softmax(l) v, to first order.

  bfloat16 rounds to 8 significant bits (unit roundoff u = 2^-8). The scaled
  query and the logits may each be rounded once (error <= 2 u |l| in l); a
  softmax whose logits move by delta moves its output by at most 2 delta max|v|;
  the weights and the output are rounded once more (u max|v| each):
  u max|v| (4 |l| + 2). Both kernels and a float64 reference of the same
  bfloat16 inputs stay within it; a dropped mask or a wrong scale moves the
  output by about max|v|.
  """
  return 2.0 ** -8 * largest_value * (4.0 * largest_logit + 2.0)
