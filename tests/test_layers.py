"""The library's import graph: layered, acyclic, no function-local imports of project modules.

Read from the source with ``ast`` (nothing is imported), so the check is cheap and also sees
imports inside functions. Layers, lowest first; a module may import its own layer and the ones
before it (docs/design.md draws the same picture).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("runtime", "kernels", "engine", "models", "data", "tasks", "training", "grids", "convert")
# Third-party packages a module may import lazily because they are optional (not in requirements.txt).
OPTIONAL_PACKAGES = {"torch", "torchvision", "onnx", "onnxruntime", "tensorflow", "tensorflow_datasets", "nibabel"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import of ``hkt_jax``, ``experiments`` or
    ``tests``, and of the optional packages; ``from pkg import sub`` counts as importing ``pkg.sub`` when
    ``sub`` is a module."""
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                for alias in child.names:
                    candidate = f"{child.module}.{alias.name}"
                    as_module = (ROOT / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                        ROOT / candidate.replace(".", "/") / "__init__.py"
                    ).exists()
                    found.append((candidate if as_module else child.module, in_function, child.lineno))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return found


def _library_graph() -> dict[str, list[tuple[str, bool, int]]]:
    return {_module_name(path): _imports(path) for path in sorted((ROOT / "hkt_jax").rglob("*.py"))}


GRAPH = _library_graph()


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def _optional_dependency_module(module: str) -> bool:
    """A project module that needs an optional package at import time (so importing it lazily is
    importing that package lazily)."""
    return any(name.split(".")[0] in OPTIONAL_PACKAGES and not local for name, local, _ in GRAPH.get(module, []))


def test_every_library_module_sits_in_a_layer():
    loose = [m for m in GRAPH if m != "hkt_jax" and _layer(m) is None]
    assert not loose, f"modules outside the layer folders {LAYERS}: {loose}"


def test_imports_point_down_the_layers():
    upward = []
    for module, imports in GRAPH.items():
        for name, _, line in imports:
            if name.startswith(("experiments", "tests")):
                upward.append(f"{module}:{line} imports {name} (the library never imports entry points or tests)")
            elif name.startswith("hkt_jax.") and module != "hkt_jax":
                source, target = _layer(module), _layer(name)
                if target is not None and source is not None and target > source:
                    upward.append(f"{module}:{line} ({LAYERS[source]}) imports {name} ({LAYERS[target]})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_function_local_imports_of_project_modules():
    local = [
        f"{module}:{line} imports {name} inside a function"
        for module, imports in GRAPH.items()
        for name, in_function, line in imports
        if in_function and name.startswith("hkt_jax") and not _optional_dependency_module(name)
    ]
    assert not local, "\n".join(local)


def test_no_import_cycles():
    edges = {m: sorted({n for n, _, _ in imports if n in GRAPH and n != m}) for m, imports in GRAPH.items()}
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    edges = {
        m: [n for n in targets if not (m == n.rpartition(".")[0] or n == "hkt_jax")] for m, targets in edges.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in edges[module]:
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in edges:
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_what_it_forbids(tmp_path):
    """The parser finds function-local imports and ``from pkg import module`` forms (else the tests
    above would pass vacuously)."""
    source = tmp_path / "probe.py"
    source.write_text("from hkt_jax.engine import ga\n\ndef f():\n    from hkt_jax.training import train\n")
    found = _imports(source)
    assert ("hkt_jax.engine.ga", False, 1) in found and ("hkt_jax.training.train", True, 4) in found
    assert any(name == "hkt_jax.engine.hkt" for name, _, _ in GRAPH["hkt_jax.training.factories"])
