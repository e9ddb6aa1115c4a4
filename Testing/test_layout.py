"""The engine's layout, read from its imports (every ``import``, lazy ones included): packages
in layers from the ground up, imports running downward only, no import circles, no private
name taken from another module, files and functions of a readable size (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mtkd"
# From the ground up: a unit (a top-level module or package of mtkd) imports only units of
# the layers below its own. ARCHITECTURE.md says what each owns.
LAYERS = [
    ["mtkd.errors"],
    ["mtkd", "mtkd.processes", "mtkd.progress", "mtkd.metrics", "mtkd.devices"],
    ["mtkd.config_paths"],
    ["mtkd.config"],
    ["mtkd.data"],
    ["mtkd.models"],
    ["mtkd.modelfiles"],
    ["mtkd.run_folder", "mtkd.folder_lock"],
    ["mtkd.distill", "mtkd.infer"],
    ["mtkd.engine"],
    ["mtkd.export", "mtkd.library"],
    ["mtkd.ablation", "mtkd.protocols"],
    ["mtkd.demo_data", "mtkd.environment", "mtkd.config_reference"],
    ["mtkd.demo"],
    ["mtkd.cli"],
    ["mtkd.__main__"],
]
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 100


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


SOURCES = _sources()


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) of every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.append((submodule, None) if submodule in SOURCES else (module, alias.name))
    return [(module, imported) for module, imported in found if module.split(".")[0] == "mtkd"]


GRAPH = {name: _imports(name, path) for name, path in SOURCES.items()}


def _unit(module: str) -> str:
    """The layered unit of a module: its top-level package or module (``mtkd.engine``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_every_unit_has_a_layer():
    placed = [unit for layer in LAYERS for unit in layer]
    assert len(placed) == len(set(placed))
    assert {_unit(name) for name in SOURCES} == set(placed)


def test_imports_run_downward_only():
    layer_of = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}
    upward = sorted(
        f"{name} imports {module}"
        for name, imports in GRAPH.items()
        for module, _ in imports
        if _unit(module) != _unit(name) and layer_of[_unit(module)] >= layer_of[_unit(name)]
    )
    assert not upward, "imports that do not run downward:\n" + "\n".join(upward)


def test_no_import_circles():
    """No module reaches itself through imports (within a unit too)."""
    edges = {name: {m for m, _ in imports if m in SOURCES} for name, imports in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in edges:
        if name not in index:
            visit(name)
    assert not circles


def test_no_private_name_from_another_module():
    private = sorted(
        f"{name} imports {imported} from {module}"
        for name, imports in GRAPH.items()
        for module, imported in imports
        if imported and imported.startswith("_") and not imported.startswith("__")
        if module != name
    )
    assert not private


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_files_and_functions_are_short():
    too_long = []
    for path in SOURCES.values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            too_long.append(f"{_relative(path)}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                key = f"{_relative(path)}:{node.name}"
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{key}: {length} lines")
    assert not too_long
