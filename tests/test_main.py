"""The command line: a user's mistake is one line and exit status 2, --debug shows the traceback."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No dataset named: a config error, found before any data or model is touched.
NO_DATA = ["--config=configs/vpt.py:method=vpt_deep"]


def _run(args, tmp_path):
  return subprocess.run([sys.executable, "run.py", *args, f"--workdir={tmp_path / 'run'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_config_error_is_one_line_with_exit_status_2(tmp_path):
  out = _run(NO_DATA, tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  # Nothing else: not TensorFlow's load-time oneDNN notice (main._import_tensorflow_quietly).
  assert out.stderr.splitlines() == [
      "run.py: error: config.data.builder and config.data.task are both empty; "
      "set a TFDS dataset (--config.data.builder=dmlab:2.0.1) or a task "
      "(--config.data.task=vtab/dmlab)"]


def test_a_variant_typo_is_one_line_naming_the_closest_variants(tmp_path):
  out = _run(["--config=configs/vpt.py:method=vpt_deep,builder=dmlab,variant=L16"], tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  line, = out.stderr.splitlines()
  assert line.startswith("run.py: error: Unknown ViT variant 'L16'") and "did you mean" in line


def test_debug_shows_the_traceback(tmp_path):
  out = _run(NO_DATA + ["--debug"], tmp_path)
  assert out.returncode != 0
  assert "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_export_of_many_tasks_needs_an_output_directory():
  out = subprocess.run([sys.executable, "run.py", "--mode=export", "--tasks=a=/exports/a"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "--mode=export --tasks=... writes one model: give --output=DIR" in out.stderr
