"""The core's layout (#13 point 1): no import circle between its modules, the bulk step never sees the analyzer,
and no module reaches into another object's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import leafguard

PACKAGE = Path(leafguard.__file__).parent
CORE = sorted([*(PACKAGE / "observe").glob("*.py"), *(PACKAGE / "detect").glob("*.py")])


def _imports(path: Path) -> set[str]:
    """The leafguard modules ``path`` imports, at run time or for type checking alike."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leafguard"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("leafguard"))
    return out


def _name(path: Path) -> str:
    return "leafguard." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def test_the_core_modules_import_no_circle_and_the_bulk_step_not_the_analyzer() -> None:
    names = {_name(p): p for p in CORE if p.name != "__init__.py"}
    graph = {n: {m for m in _imports(p) if m in names and m != n} for n, p in names.items()}
    assert "leafguard.observe.analyzer" not in graph["leafguard.observe.fastpath"]
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            assert state.get(m) != 1, f"import circle: {' -> '.join([*path, n, m])}"
            if m not in state:
                visit(m, [*path, n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_no_core_module_uses_another_objects_private_names() -> None:
    found = []
    for path in CORE:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert found == []
