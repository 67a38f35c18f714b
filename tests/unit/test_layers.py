"""The package layers: imports point down only (docs/architecture.md).

The contract lives in pyproject.toml ([tool.importlinter]); ``make lint``
runs ``lint-imports`` on it, and this test runs the same check on the import
graph of the whole tree (every module, every import, lazy ones included).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp
from importlinter import cli

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"


def _config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]


def test_every_package_of_the_tree_is_under_the_contract() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"}
    assert set(_config()["root_packages"]) == packages


def test_the_graph_is_real_and_the_layers_hold() -> None:
    graph = grimp.build_graph(*_config()["root_packages"], cache_dir=None)
    # A sanity floor: the check below is only as good as this graph.
    for importer, imported in (("router", "mesh"), ("mesh", "blocks"), ("engine_adapters", "blocks")):
        assert graph.chain_exists(importer=importer, imported=imported, as_packages=True)
    assert graph.direct_import_exists(importer="mesh.core", imported="blocks.delta")
    forbidden = [
        ("blocks", "engine_adapters"), ("blocks", "mesh"), ("blocks", "router"), ("blocks", "kvmesh"),
        ("engine_adapters", "mesh"), ("engine_adapters", "router"), ("engine_adapters", "kvmesh"),
        ("mesh", "engine_adapters"), ("mesh", "router"), ("mesh", "kvmesh"),
        ("router", "kvmesh"), ("kvmesh_pb", "blocks"), ("blocks", "kvmesh_pb"),
    ]  # fmt: skip
    broken = [(a, b) for a, b in forbidden if graph.chain_exists(importer=a, imported=b, as_packages=True)]
    assert broken == [], f"imports that point up or sideways: {broken}"
    assert cli.lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True) == 0


def test_no_import_cycles() -> None:
    graph = grimp.build_graph(*_config()["root_packages"], cache_dir=None)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    assert cycles == [], f"modules that import each other: {cycles}"
