"""The package: pyproject.toml agrees with requirements.txt, and a wheel built from
the checkout installs into a fresh virtual environment and runs from any directory."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.suites import test_quickstart

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Build tools: requirements.txt keeps them so that CI can build the wheel offline.
BUILD_TOOLS = {"setuptools", "wheel"}


def _pyproject() -> dict:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _pins() -> dict:
  """{canonical name: version or None} of requirements.txt."""
  pins = {}
  with open(os.path.join(REPO, "requirements.txt")) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        requirement = Requirement(line)
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        pins[canonicalize_name(requirement.name)] = exact[0] if exact else None
  return pins


def _applicable(requirements: list) -> list:
  """The requirements whose environment marker holds here (the CI machine)."""
  parsed = [Requirement(r) for r in requirements]
  return [r for r in parsed if r.marker is None or r.marker.evaluate()]


def _assert_pins_satisfy(requirements: list, pins: dict) -> set:
  names = set()
  for requirement in requirements:
    name = canonicalize_name(requirement.name)
    names.add(name)
    assert name in pins, f"{requirement} is not pinned in requirements.txt"
    if pins[name] is not None:
      assert requirement.specifier.contains(pins[name]), (
          f"requirements.txt pins {name}=={pins[name]}, outside pyproject's {requirement}")
  return names


def test_requirements_txt_is_a_pinned_instance_of_the_package():
  project, pins = _pyproject()["project"], _pins()
  runtime = _assert_pins_satisfy(_applicable(project["dependencies"]), pins)
  dev = _assert_pins_satisfy(_applicable(project["optional-dependencies"]["dev"]), pins)
  build = _assert_pins_satisfy(_applicable(_pyproject()["build-system"]["requires"]), pins)
  assert build == BUILD_TOOLS
  assert set(pins) == runtime | dev | build, "requirements.txt and pyproject.toml differ"
  # macOS and ARM Linux get `tensorflow` instead of `tensorflow-cpu`: the same release.
  (full_tf,) = [r for r in map(Requirement, project["dependencies"]) if r.name == "tensorflow"]
  assert full_tf.specifier.contains(pins["tensorflow-cpu"])


def test_accelerator_extras_pin_the_same_jax_as_the_cpu_set():
  jax_pin = _pins()["jax"]
  assert _pins()["jaxlib"] == jax_pin
  extras = _pyproject()["project"]["optional-dependencies"]
  for extra in ("tpu", "cuda12", "cuda13"):
    (requirement,) = [Requirement(r) for r in extras[extra]]
    assert requirement.name == "jax" and requirement.extras == {extra}
    assert str(requirement.specifier) == f"=={jax_pin}"


def test_the_wheel_lists_every_package_of_the_checkout():
  setuptools = _pyproject()["tool"]["setuptools"]
  found = {os.path.relpath(folder, REPO).replace(os.sep, ".")
           for folder, _, files in os.walk(os.path.join(REPO, "vpt_jax"))
           if "__init__.py" in files}
  mapped = {f"vpt_jax.{folder}": folder for folder in ("configs", "assets")}
  assert set(setuptools["packages"]) == found | set(mapped)
  assert setuptools["package-dir"] == mapped


def _fresh_venv(root) -> str:
  """A venv without pip that sees this interpreter's packages (jax, TF: no reinstall).

  ``--system-site-packages`` would expose the base interpreter's, not this
  venv's, so a .pth file appends this environment's site-packages instead.
  """
  venv = os.path.join(root, "venv")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
  python = os.path.join(venv, "bin", "python")
  purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                            "['purelib'])"], check=True, capture_output=True,
                           text=True).stdout.strip()
  with open(os.path.join(purelib, "outer_environment.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  return venv


_PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]


def _copy_checkout(root) -> str:
  """The package's files copied out of the checkout (a build writes beside them)."""
  source = os.path.join(root, "source")
  os.makedirs(source)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), source)
  for name in ("vpt_jax", "configs", "assets"):
    shutil.copytree(os.path.join(REPO, name), os.path.join(source, name),
                    ignore=shutil.ignore_patterns("__pycache__"))
  return source


def _install(venv: str, *what: str) -> None:
  # --no-index: every dependency must already be met by the pinned set (no download).
  install = subprocess.run(_PIP + ["--python", os.path.join(venv, "bin", "python"), "install",
                                   "--no-index", "--no-build-isolation", *what],
                           capture_output=True, text=True)
  assert install.returncode == 0, install.stderr[-3000:]


def _build_and_install(root) -> str:
  """Builds the wheel from a copy of the checkout's files; installs it offline."""
  source = _copy_checkout(root)
  subprocess.run(_PIP + ["wheel", "--no-deps", "--no-build-isolation", "-w", root, source],
                 check=True, capture_output=True)
  (wheel,) = [f for f in os.listdir(root) if f.endswith(".whl")]
  venv = _fresh_venv(root)
  _install(venv, os.path.join(root, wheel))
  return venv


def test_an_editable_install_finds_the_checkouts_configs_and_backbone(tmp_path):
  source = _copy_checkout(tmp_path)
  venv = _fresh_venv(tmp_path)
  _install(venv, "-e", source)
  script = ("from vpt_jax import cli; cli.make_configs_importable(); "
            "print(cli.load_config_file(cli.resolve_config_spec('vpt_jax:quickstart')).backbone)")
  out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", script], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == os.path.join(source, "assets", "sprites_vit_nano8.npz")


def test_the_installed_wheel_runs_from_outside_the_checkout(tmp_path):
  venv = _build_and_install(tmp_path)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  run = lambda command: subprocess.run(command, cwd=elsewhere, env=env, capture_output=True,
                                       text=True, timeout=600)
  python = os.path.join(venv, "bin", "python")
  where = run([python, "-c", "import vpt_jax; print(vpt_jax.__file__)"])
  assert where.stdout.startswith(venv), where.stdout + where.stderr
  help_text = run([os.path.join(venv, "bin", "vpt-jax"), "--help"])
  # absl ends --help with exit status 1, whatever the program.
  assert "--compilation_cache_dir" in help_text.stdout, help_text.stderr[-3000:]
  assert "vpt_jax:quickstart" in help_text.stdout
  # The quickstart's :ci variant, cut to one run of one epoch: configs, the shipped
  # backbone and the local TFDS builders all come from the installed package.
  workdir = tmp_path / "quickstart"
  out = run([os.path.join(venv, "bin", "vpt-jax"), "--config=vpt_jax:quickstart:ci",
             f"--workdir={workdir}", *test_quickstart.CI_ONE_RUN])
  assert out.returncode == 0, out.stderr[-3000:]
  test_quickstart.check_ci_run(workdir, out.stdout)
  # The module entry point, on a config name that does not exist.
  unknown = run([python, "-m", "vpt_jax", "--config=vpt_jax:nope", f"--workdir={workdir}"])
  assert unknown.returncode == 1 and "quickstart" in unknown.stderr
