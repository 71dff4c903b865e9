"""benchmarks/official_vpt_step.py's one-line errors, in our interpreter (no torch, no
official code): it must say what is wrong before importing anything heavy."""

import ast
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "official_vpt_step.py")


def _run(*options):
  return subprocess.run([sys.executable, SCRIPT, *options], capture_output=True, text=True)


def test_a_folder_that_is_no_checkout_is_named_in_one_line(tmp_path):
  result = _run("--checkout", str(tmp_path))
  assert result.returncode == 1 and result.stdout == ""
  assert result.stderr.strip().splitlines() == [
      f"official_vpt_step.py: error: --checkout {tmp_path} is not a KMnP/vpt checkout "
      "(no src/models/vit_prompt/vit.py); pass the folder that holds src/ and configs/"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_an_interpreter_without_torch_is_named_in_one_line(tmp_path):
  marker = tmp_path / "src" / "models" / "vit_prompt" / "vit.py"
  marker.parent.mkdir(parents=True)
  marker.write_text("raise AssertionError('never imported')\n")
  result = _run("--checkout", str(tmp_path), "--method", "full")
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"official_vpt_step.py: error: torch is not importable by {sys.executable}")


def test_it_imports_neither_jax_nor_vpt_jax_nor_our_benchmarks():
  imported = set()
  for node in ast.walk(ast.parse(open(SCRIPT).read())):
    if isinstance(node, ast.Import):
      imported |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported.add((node.module or "").split(".")[0])
  assert imported.isdisjoint({"jax", "vpt_jax", "configs", "common", "flax", "numpy"})
  assert {"torch", "src"} <= imported  # torch and the official code, inside a function
