"""The package's import structure: scripts nothing imports, and no import cycles."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = {"mmtl.train", "mmtl.evaluate", "mmtl.bench", "mmtl.generate.__main__"}  # `python -m`


def _module_name(file: pathlib.Path) -> str:
  parts = file.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
  path = ROOT.joinpath(*name.split("."))
  return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
  """mmtl module -> the mmtl modules it imports anywhere in its body (function-local
  imports included: a cycle they hide is still a cycle)."""
  graph = {}
  for file in sorted((ROOT / "mmtl").rglob("*.py")):
    name = _module_name(file)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    edges = set()
    for node in ast.walk(ast.parse(file.read_text())):
      if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names if a.name.startswith("mmtl")}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmtl"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          edges.add(full if _is_module(full) else node.module)
    graph[name] = edges - ancestors - {name}
  return graph


def test_graph_sees_the_package():
  graph = import_graph()
  assert {
    "mmtl.train",
    "mmtl.train_step",
    "mmtl.train_state",
    "mmtl.data.device",
    "mmtl.models.fusion",
  } <= set(graph)
  assert "mmtl.train_step" in graph["mmtl.train"]
  assert "mmtl.models.fusion" in graph["mmtl.train_state"]


def test_no_module_imports_a_script():
  graph = import_graph()
  importers = {m: sorted(graph[m] & SCRIPTS) for m in graph if graph[m] & SCRIPTS}
  assert not importers, f"scripts are entry points, not libraries: {importers}"


def test_no_import_cycles():
  graph = import_graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(m):
    state[m] = 1
    path.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 1:
        raise AssertionError("import cycle: " + " -> ".join(path[path.index(n) :] + [n]))
      if n not in state:
        visit(n)
    path.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
