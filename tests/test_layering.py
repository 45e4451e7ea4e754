"""The package's layering rule (docs/design.md): packages import only downward, with no circles.

    models, parallel, data  <-  training  <-  compression, inference  <-  commands
                            <-  convert, sweep  <-  cli

Read from the package's own import statements (every `import` and `from ... import`, at any
depth, TYPE_CHECKING blocks included), so a lazy or type-only import counts too.
"""

import ast
import pathlib

import pytest

import polyglot_jax

PACKAGE = pathlib.Path(polyglot_jax.__file__).parent
LAYERS = (("models", "parallel", "data"), ("training",), ("compression", "inference"),
          ("commands",), ("convert", "sweep"), ("cli",))
RANK = {name: rank for rank, group in enumerate(LAYERS) for name in group}


def _module_name(path: pathlib.Path) -> str:
  parts = ("polyglot_jax",) + path.relative_to(PACKAGE).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, module: str) -> set[str]:
  """Every polyglot_jax module or name `path` imports (relative imports resolved)."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      found.add(base)
      found |= {f"{base}.{alias.name}" for alias in node.names}
  return {name for name in found if name == "polyglot_jax" or name.startswith("polyglot_jax.")}


def _graph() -> dict[str, set[str]]:
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  return {module: {name for name in _imports(path, module) if name in files and name != module}
          for module, path in files.items()}


GRAPH = _graph()


def _layer(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_every_package_module_is_in_a_layer():
  outside = sorted(m for m in GRAPH if m != "polyglot_jax" and _layer(m) is None)
  assert not outside, f"modules outside every layer (add them to a package): {outside}"


def test_no_upward_imports():
  upward = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
                  if _layer(m) and _layer(d) and RANK[_layer(d)] > RANK[_layer(m)])
  assert not upward, f"upward imports: {upward}"


def test_no_import_circles():
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(module: str, path: list[str]) -> None:
    state[module] = 1
    for dep in sorted(GRAPH[module]):
      if state.get(dep) == 1:
        cycle = path[path.index(dep):] + [dep]
        pytest.fail(f"import circle: {' -> '.join(cycle)}")
      if dep not in state:
        visit(dep, path + [dep])
    state[module] = 2

  for module in sorted(GRAPH):
    if module not in state:
      visit(module, [module])


def test_the_checker_sees_a_planted_upward_import(tmp_path):
  """The rule above can fail: an upward import in a file is found by `_imports`."""
  planted = PACKAGE / "models" / "planted_for_test.py"  # parsed only, never written
  source = "from polyglot_jax.commands import runner\nimport polyglot_jax.cli\n"
  path = tmp_path / "planted_for_test.py"
  path.write_text(source, encoding="utf-8")
  found = _imports(path, _module_name(planted))
  assert {"polyglot_jax.commands.runner", "polyglot_jax.cli"} <= found
