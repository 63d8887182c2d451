"""The house drawing holds: imports point down (common below worker and coordinator, the bench on top) and run in no
circle, counting the imports made inside functions too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "worker", "coordinator")
BELOW = {  # package -> the packages it may import besides itself
    "common": set(),
    "worker": {"common"},
    "coordinator": {"common"},  # it talks to workers only through the protocol
    "coordinator.bench": {"common", "worker"},  # it starts workers and measures them
}


def _modules() -> dict:
    """Module name -> the project's modules it imports."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = _imports(path)
    return modules


def _imports(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found


def test_no_import_points_up():
    upward = [(module, imported) for module, imports in _modules().items() for imported in imports
              if imported.split(".")[0] not in _allowed(module)]
    assert not upward


def _allowed(module: str) -> set:
    """The packages a module may import: its own, and those below it (a subpackage also its parent's)."""
    package = next(name for name in sorted(BELOW, key=len, reverse=True) if f"{module}.".startswith(f"{name}."))
    top = package.split(".")[0]
    return BELOW[package] | BELOW[top] | {top}


def test_no_modules_import_each_other_in_a_circle():
    modules = _modules()
    graph = {module: {imported for imported in imports if imported in modules} - {module}
             for module, imports in modules.items()}
    circles = [module for module in graph if _reaches(graph, module, module)]
    assert not circles


def _reaches(graph: dict, start: str, goal: str) -> bool:
    seen, todo = set(), list(graph[start])
    while todo:
        module = todo.pop()
        if module == goal:
            return True
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    return False


@pytest.mark.parametrize("upward_import", ["from coordinator.cluster import Cluster", "import worker.compute"])
def test_the_check_sees_an_upward_import(tmp_path, upward_import):
    module = tmp_path / "x.py"
    module.write_text(f"def f():\n    {upward_import}\n")
    assert _imports(module) & {"coordinator.cluster", "worker.compute"}
    assert "worker" not in _allowed("common.x") and "worker" not in _allowed("coordinator.x")
    assert "worker" in _allowed("coordinator.bench.x")
