"""The evaluation step and its summary on hand-made logits, labels and masks.

Padded rows (mask False) are zero images with label 0 in a real run, which a
model tends to call class 0: counting them would inflate the accuracy. The
expected sums here are written out by hand.
"""

import jax
import numpy as np

from vpt_jax.training import steps


class _LogitsAsFeatures:
  """A stand-in model whose cached "features" are already the logits."""

  @staticmethod
  def apply(variables, inputs, *, train, from_features=False):
    assert from_features and not train and variables == {}
    return inputs


# Six classes (so top-5 is not trivially everything). Rows 0-2 are real, rows
# 3-4 padding that predicts its label 0 perfectly.
LOGITS = np.array([
    [0.0, 3.0, 1.0, 0.0, 0.0, 0.0],   # label 1: top-1 right
    [2.0, 0.0, 1.0, 0.0, 0.0, 0.0],   # label 2: top-1 wrong, top-5 right
    [-1.0, 0.0, 0.0, 0.0, 0.0, 5.0],  # label 0: last of six, wrong at top-5 too
    [9.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # padding
    [9.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # padding
], np.float32)
LABELS = np.array([1, 2, 0, 0, 0], np.int32)
MASK = np.array([True, True, True, False, False])


def _cross_entropy(row, label):
  return np.log(np.sum(np.exp(row.astype(np.float64)))) - row[label]


def test_eval_step_counts_only_real_rows():
  eval_step = jax.jit(steps.make_eval_step(_LogitsAsFeatures(), mean=(0.0,) * 3,
                                           std=(1.0,) * 3))
  totals = jax.device_get(eval_step({}, {"features": LOGITS, "label": LABELS, "mask": MASK}))
  assert float(totals["count"]) == 3.0
  assert float(totals["correct_top1"]) == 1.0  # only row 0
  assert float(totals["correct_top5"]) == 2.0  # rows 0 and 1
  expected_loss = sum(_cross_entropy(LOGITS[i], LABELS[i]) for i in range(3))
  np.testing.assert_allclose(float(totals["loss_sum"]), expected_loss, rtol=1e-6)


def test_summary_divides_by_the_real_count():
  summary = steps.summarize_eval({"count": 3.0, "correct_top1": 1.0, "correct_top5": 2.0,
                                  "loss_sum": 6.0})
  assert summary == {"top1": 1 / 3, "top5": 2 / 3, "loss": 2.0, "count": 3}


def test_summary_of_nothing_is_zero_not_a_division_error():
  summary = steps.summarize_eval({"count": 0.0, "correct_top1": 0.0, "correct_top5": 0.0,
                                  "loss_sum": 0.0})
  assert summary == {"top1": 0.0, "top5": 0.0, "loss": 0.0, "count": 0}
