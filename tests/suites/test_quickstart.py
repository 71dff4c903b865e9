"""The quickstart's shortened CI variant, through run.py as a newcomer runs it."""

import json
import os
import subprocess
import sys

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


def check_ci_results(workdir, stdout: str) -> None:
  """The :ci variant's five runs, their table and their exports (also run from an
  installed wheel outside the checkout: tests/integration/test_packaging.py)."""
  with open(workdir / "results.json") as f:
    rows = json.load(f)
  assert [(r["task"], r["method"]) for r in rows] == [
      ("count", m) for m in ("vpt_deep", "vpt_shallow", "linear", "full", "scratch")]
  for row in rows:
    assert {"task", "method", "accuracy", "trainable_params"} <= set(row)
    # The suite's table reports each run's own test accuracy, correct / count.
    with open(workdir / row["task"] / row["method"] / "results.json") as f:
      test = json.load(f)["test"]
    assert row["accuracy"] == test["top1"]
    correct = test["top1"] * test["count"]
    assert test["count"] > 0 and abs(correct - round(correct)) < 1e-6
  by_method = {r["method"]: r for r in rows}
  # nano/8: 4 blocks x 10 prompts x 64 + a 64 x 6 head; the backbone has 147,520.
  assert by_method["vpt_deep"]["trainable_params"] == 4 * 10 * 64 + 64 * 6 + 6
  assert by_method["linear"]["trainable_params"] == 64 * 6 + 6
  assert by_method["full"]["trainable_params"] == 147_520 + 390
  assert "| count | vpt_deep |" in stdout
  assert os.path.exists(workdir / "count" / "vpt_deep" / "export" / "task.json")


def test_quickstart_ci_variant_from_the_checkout(tmp_path):
  # Cut to one run of one epoch in one process: the whole :ci variant runs from an
  # installed wheel outside the checkout (test_packaging), with check_ci_results.
  workdir = tmp_path / "quickstart"
  out = subprocess.run(
      [sys.executable, "run.py", "--config=configs/quickstart.py:ci", f"--workdir={workdir}",
       "--config.run_order=('vpt_deep',)", "--config.workers=1", "--config.base.optim.epochs=1"],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(workdir / "results.json") as f:
    (row,) = json.load(f)
  assert (row["task"], row["method"]) == ("count", "vpt_deep")
  assert row["trainable_params"] == 4 * 10 * 64 + 64 * 6 + 6  # nano/8 VPT-deep, 6 classes
  assert "| count | vpt_deep |" in out.stdout
