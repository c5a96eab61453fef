"""Imports run downward only: the package's layers, read from the source with ast (function-level imports too).

Layers, low to high: the base modules (fileio, modalities, backends, ops, checkpoint_io) -> data, models, ssl
-> eval -> train -> cli. The op library (terrafm_kernels) sits below all of them and never imports terrafm.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = ("terrafm.fileio", "terrafm.modalities", "terrafm.backends", "terrafm.ops", "terrafm.checkpoint_io")
LOWER = ("terrafm.data", "terrafm.models", "terrafm.ssl")
UPPER = ("terrafm.train", "terrafm.eval", "terrafm.cli")


def _module_names(package: str, folder: Path) -> dict[str, Path]:
    names = {}
    for f in sorted(folder.rglob("*.py")):
        parts = (package, *f.relative_to(folder).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return names


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """First-party modules `name` imports anywhere in its file (a from-import of a submodule counts as it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in package a.b is a.b.x, `from .. import x` is a.x
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    return {m for m in found if m.split(".")[0] in ("terrafm", "terrafm_kernels") and m != "terrafm"}


MODULES = _module_names("terrafm", ROOT / "terrafm") | _module_names("terrafm_kernels", ROOT / "kernels")
GRAPH = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _violations(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{m} imports {i}" for m, imported in sorted(GRAPH.items()) if _within(m, sources)
            for i in sorted(imported) if _within(i, forbidden)]


def test_the_graph_is_read():
    assert "terrafm.checkpoint_io" in GRAPH["terrafm.models"]
    assert "terrafm.train.checkpoint" in GRAPH["terrafm.train.trainer"]


@pytest.mark.parametrize("sources, forbidden", [
    (("terrafm_kernels",), ("terrafm",)),
    (BASE, LOWER + UPPER),
    (LOWER, UPPER),
    (("terrafm.eval",), ("terrafm.train", "terrafm.cli")),
    (("terrafm.train",), ("terrafm.cli",)),
])
def test_no_import_runs_upward(sources, forbidden):
    assert _violations(sources, forbidden) == []


def test_a_checkpoint_reader_in_models_importing_train_would_be_caught():
    assert _violations(("terrafm.models",), UPPER) == []
    GRAPH["terrafm.models"].add("terrafm.train.checkpoint")
    try:
        assert _violations(("terrafm.models",), UPPER) == ["terrafm.models imports terrafm.train.checkpoint"]
    finally:
        GRAPH["terrafm.models"].discard("terrafm.train.checkpoint")


def _cycle() -> list[str] | None:
    """One import cycle among the first-party modules (a package's __init__ counts as the package), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle() is None
