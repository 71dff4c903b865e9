"""The house rules, read from the code: layers import only downwards, no import
cycles, no module over 400 lines and no function over 60 (docs/architecture.md)."""

import ast
import collections
import os


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "vpt_jax")
# Bottom to top; a module may import its own layer and the layers below it.
LAYERS = ("errors", "params", "data", "checkpoints", "models", "methods", "export", "training",
          "protocol", "suites", "cli", "main", "__main__")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict:
  """{"vpt_jax.models.vit": path} for every module of the package."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def _layer(module: str) -> str:
  """vpt_jax.models.vit -> "models"; vpt_jax.cli -> "cli"."""
  return module.split(".")[1] if "." in module else "__init__"


def _imports(path: str) -> set:
  """The vpt_jax modules a file imports (at any depth of the file)."""
  targets = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      targets.update(a.name for a in node.names if a.name.startswith("vpt_jax."))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vpt_jax"):
      for alias in node.names:  # "from vpt_jax.models import vit" names a module
        targets.add(f"{node.module}.{alias.name}")
  return targets


def _graph() -> dict:
  modules = _modules()
  return {m: {t if t in modules else t.rpartition(".")[0] for t in _imports(p)} - {m}
          for m, p in modules.items()}


def test_every_module_belongs_to_a_layer():
  unknown = sorted(m for m in _modules() if _layer(m) not in LAYERS + ("__init__",))
  assert not unknown, f"add their packages to LAYERS (and docs/architecture.md): {unknown}"


def _upward_imports(graph: dict) -> list:
  """["module -> target"] for every import of a higher layer in {module: {targets}}."""
  upward = []
  for module, targets in graph.items():
    here = LAYERS.index(_layer(module)) if _layer(module) in LAYERS else -1
    for target in targets:
      if _layer(target) in LAYERS and LAYERS.index(_layer(target)) > here:
        upward.append(f"{module} -> {target}")
  return sorted(upward)


def test_layers_import_only_downwards():
  upward = _upward_imports(_graph())
  assert not upward, "\n".join(upward)


def test_no_import_cycles():
  graph, state, cycles = _graph(), {}, []

  def visit(module, stack):
    state[module] = "open"
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
      elif target not in state:
        visit(target, stack + [target])
    state[module] = "done"
  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, "\n".join(cycles)


def test_no_module_over_400_lines():
  sizes = {m: open(p).read().count("\n") for m, p in _modules().items()}
  big = {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES}
  assert not big, big


def test_no_function_over_60_lines():
  long = collections.Counter()
  for module, path in _modules().items():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          long[f"{module}.{node.name}"] = length
  assert not long, dict(long)


def test_the_layer_check_sees_an_upward_import(tmp_path):
  """The checker itself, on a hand-made file and graph: models importing training
  is reported, training importing models is not."""
  path = tmp_path / "probe.py"
  path.write_text("from vpt_jax.training import steps\nimport vpt_jax.models.vit\n")
  assert _imports(str(path)) == {"vpt_jax.training.steps", "vpt_jax.models.vit"}
  graph = {"vpt_jax.models.probe": {"vpt_jax.training.steps", "vpt_jax.params.trees"},
           "vpt_jax.training.probe": {"vpt_jax.models.vit"}}
  assert _upward_imports(graph) == ["vpt_jax.models.probe -> vpt_jax.training.steps"]


def test_test_files_mirror_the_package_and_stay_small():
  """tests/<layer>/test_<module>.py tests vpt_jax/<layer>/<module>.py; tests/integration/
  runs the whole stack, tests/benchmarks/ the benchmark scripts' measures."""
  tests = os.path.dirname(os.path.abspath(__file__))
  stray, big = [], {}
  for folder, _, files in os.walk(tests):
    layer = os.path.relpath(folder, tests)
    for name in files:
      if not (name.startswith("test_") and name.endswith(".py")):
        continue
      lines = open(os.path.join(folder, name)).read().count("\n")
      if lines > MAX_MODULE_LINES:
        big[os.path.join(layer, name)] = lines
      module = name[len("test_"):-len(".py")]
      target = (os.path.join(PACKAGE, f"{module}.py") if layer == "." else
                os.path.join(REPO, "benchmarks", f"{module}.py") if layer == "benchmarks" else
                None if layer == "integration" else os.path.join(PACKAGE, layer, f"{module}.py"))
      if layer != "." or module != "architecture":
        if target is not None and not os.path.exists(target):
          stray.append(os.path.join(layer, name))
  assert not stray, f"test files without their module: {stray}"
  assert not big, big
