"""The quickstart's shortened CI variant, through run.py as a newcomer runs it."""

import json
import os
import subprocess
import sys

import pytest

from vpt_jax.checkpoints import npz
from vpt_jax.checkpoints import vit_layouts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKBONE = os.path.join(REPO, "assets", "sprites_vit_nano8.npz")


def test_shipped_backbone_is_small_and_in_the_official_layout():
  assert os.path.getsize(BACKBONE) < 5 * 2**20
  flat = npz.read_npz(BACKBONE)
  assert vit_layouts.detect_layout(flat) == "vit_linen"
  # nano/8: width 64, 4 blocks; no head and no prompts are shipped.
  assert flat["Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel"].shape == (64, 128)
  assert "Transformer/encoderblock_4/LayerNorm_0/scale" not in flat
  assert not [k for k in flat if k.startswith(("head/", "vpt/"))]


# The :ci variant cut to its VPT-deep run, one epoch, in one process.
CI_ONE_RUN = ("--config.run_order=('vpt_deep',)", "--config.workers=1",
              "--config.base.optim.epochs=1")


def check_ci_run(workdir, stdout: str) -> None:
  """The ``CI_ONE_RUN`` cut's row, table line and export (run from the checkout here
  and from an installed wheel outside it: tests/integration/test_packaging.py)."""
  with open(workdir / "results.json") as f:
    (row,) = json.load(f)
  assert (row["task"], row["method"]) == ("count", "vpt_deep")
  # nano/8: 4 blocks x 10 prompts x 64 + a 64 x 6 head (6 classes).
  assert row["trainable_params"] == 4 * 10 * 64 + 64 * 6 + 6
  # The suite's table reports the run's own test accuracy, correct / count.
  with open(workdir / "count" / "vpt_deep" / "results.json") as f:
    test = json.load(f)["test"]
  assert row["accuracy"] == test["top1"]
  correct = test["top1"] * test["count"]
  assert test["count"] > 0 and abs(correct - round(correct)) < 1e-6
  assert "| count | vpt_deep |" in stdout
  assert os.path.exists(workdir / "count" / "vpt_deep" / "export" / "task.json")


def test_quickstart_ci_variant_from_the_checkout(tmp_path):
  workdir = tmp_path / "quickstart"
  out = subprocess.run(
      [sys.executable, "run.py", "--config=configs/quickstart.py:ci", f"--workdir={workdir}",
       *CI_ONE_RUN], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  check_ci_run(workdir, out.stdout)


def _suite(**changes):
  from configs import quickstart as quickstart_config  # pylint: disable=g-import-not-at-top
  suite = quickstart_config.get_config("ci")
  suite.unlock()
  for key, value in changes.items():
    suite[key] = value
  return suite


def test_run_order_names_any_registry_method_with_its_optimizers_rate():
  from vpt_jax.suites import quickstart  # pylint: disable=g-import-not-at-top
  suite = _suite(run_order=("vpt_deep", "houlsby", "adaptformer"))
  # A tuned run keeps its own rate; untuned ones take their optimizer family's.
  assert quickstart.run_config(suite, "count", "vpt_deep", "/d").optim.base_lr == 0.4
  houlsby = quickstart.run_config(suite, "count", "houlsby", "/d")  # torch_adamw
  assert (houlsby.method, houlsby.optim.base_lr) == ("houlsby", 4e-3)
  assert houlsby.model.init_checkpoint == suite.backbone and not houlsby.model.from_scratch
  assert quickstart.run_config(suite, "count", "adaptformer", "/d").optim.base_lr == 0.4  # sgd


@pytest.mark.parametrize("changes, message", [
    (dict(run_order=("vpt_deep", "houlsbi")), "'houlsbi', neither a run of the suite"),
    (dict(task_order=("cont",)), "task_order names 'cont'"),
])
def test_unknown_run_or_task_fails_in_one_line_before_any_data(tmp_path, changes, message):
  from vpt_jax import errors  # pylint: disable=g-import-not-at-top
  from vpt_jax.suites import quickstart  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UserError, match=message) as caught:
    quickstart.run_suite(_suite(**changes), str(tmp_path / "w"))
  assert "\n" not in str(caught.value)
  assert not (tmp_path / "w").exists()  # nothing built, not even the workdir


def test_model_dtype_reaches_every_run_and_an_unknown_one_fails_before_any_data(tmp_path):
  from vpt_jax import errors  # pylint: disable=g-import-not-at-top
  from vpt_jax.suites import quickstart  # pylint: disable=g-import-not-at-top
  suite = _suite(run_order=("vpt_deep", "scratch", "ssf"))
  suite.base.model.dtype = "bfloat16"
  for run in suite.run_order:
    assert quickstart.run_config(suite, "count", run, "/d").model.dtype == "bfloat16"
  suite.base.model.dtype = "float16"
  with pytest.raises(errors.UserError, match="Unknown dtype 'float16'"):
    quickstart.run_suite(suite, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
