"""The packages import one way: scripts -> callbacks -> modules -> datamodules (README, "Layout"), with no cycle
between files, counting imports inside functions too (a hidden import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("datamodules", "modules", "callbacks", "scripts")  # lowest first: a package imports only those before it


def _imports(path: Path) -> set[str]:
    """The project modules (``package.file``) that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] in LAYERS and len(parts) > 1 and (REPO / parts[0] / f"{parts[1]}.py").is_file():
                found.add(f"{parts[0]}.{parts[1]}")
    return found


def _graph() -> dict[str, set[str]]:
    return {
        f"{layer}.{path.stem}": _imports(path) - {f"{layer}.{path.stem}"}
        for layer in LAYERS
        for path in sorted((REPO / layer).glob("*.py"))
        if path.stem != "__init__"
    }


def test_no_package_imports_one_above_it() -> None:
    upward = [
        f"{source} imports {target}"
        for source, targets in _graph().items()
        for target in targets
        if LAYERS.index(target.split(".")[0]) > LAYERS.index(source.split(".")[0])
    ]
    assert not upward, "; ".join(upward)


def test_no_import_cycles_between_files() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "; ".join(cycles)


@pytest.mark.parametrize("source", ["modules.fake", "datamodules.fake"])
def test_the_check_sees_a_hidden_upward_import(tmp_path: Path, source: str, monkeypatch) -> None:
    """The parser finds an import inside a function (what the first wave hid its cycles in)."""
    package, _ = source.split(".")
    fake = tmp_path / package / "fake.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from callbacks.tracking import run_dir\n    return run_dir\n")
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "tracking.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert _imports(fake) == {"callbacks.tracking"}
