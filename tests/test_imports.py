"""The import structure, as an import linter would check it (an AST scan, no imports run).

* No distribution has an import cycle among its modules -- counting every import, also
  the ones under ``TYPE_CHECKING`` and inside functions: a cycle hidden there is still one
  (the peer service and the swarm fetch depend one way only).
* The dependencies between distributions point one way: the core imports no other
  pyrsia distribution, no plugin imports the node (``pyrsia_registry``) or the CLI, and
  the node and the CLI import no package-type plugin (``pyrsia_pkg_*``): they know
  package types only through the contract and the entry points.
"""

from __future__ import annotations

import ast
from collections.abc import Container
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "pyrsia_core": ROOT / "pyrsia_core/src/pyrsia_core",
    "pyrsia_registry": ROOT / "pyrsia_registry/src/pyrsia_registry",
    "pyrsia_cli": ROOT / "pyrsia_cli/src/pyrsia_cli",
    **{p.name: p for p in sorted(ROOT.glob("plugins/*/src/pyrsia_*"))},
    **{p.name: p for p in sorted(ROOT.glob("examples/plugin/*/src/pyrsia_*"))},
}


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    return {_module_name(package, root, p): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: Container[str] | None = None) -> set[str]:
    """Every module ``path`` (module ``name``) imports, anywhere in it, absolute;
    ``modules`` are the known modules (to tell ``from pkg import submodule``)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from . import x`` / ``from pkg import sub``: x may be a module itself
            # (then the import is of that module), else a name of ``module``.
            subs = {f"{module}.{alias.name}" for alias in node.names}
            known = {m for m in subs if m in modules} if modules is not None else set()
            out.update(known)
            if len(known) < len(subs):
                out.add(module)
    return out


def _graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = {m for m in imports_of(name, path, modules) if m in modules and m != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (as a list of nodes, first repeated last), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    # TYPE_CHECKING-only and function-local imports count.
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._b import B\n" \
             "def f():\n    from ._c import C\n"
    path = ROOT / "tests" / "_imports_probe.py"
    path.write_text(source)
    try:
        deps = imports_of("pkg._a", path, {"pkg._b", "pkg._c"})
    finally:
        path.unlink()
    assert {"pkg._b", "pkg._c"} <= deps


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package: str) -> None:
    graph = _graph(package)
    assert len(graph) >= 1
    cycle = find_cycle(graph)
    assert cycle is None, f"{package} has an import cycle: {' -> '.join(cycle or [])}"


def _external(package: str) -> dict[str, set[str]]:
    """``module -> pyrsia distributions it imports`` (other than its own)."""
    out: dict[str, set[str]] = {}
    for name, path in _modules(package).items():
        tops = {m.split(".")[0] for m in imports_of(name, path)}
        out[name] = {t for t in tops if t.startswith("pyrsia_") and t != package}
    return out


def test_the_core_imports_no_other_distribution() -> None:
    offenders = {m: deps for m, deps in _external("pyrsia_core").items() if deps}
    assert not offenders, offenders


@pytest.mark.parametrize("package", sorted(p for p in PACKAGES if p.startswith("pyrsia_pkg_")
                                           or p.startswith(("pyrsia_storage_",
                                                            "pyrsia_transport_"))))
def test_plugins_do_not_import_the_node(package: str) -> None:
    offenders = {m: deps & {"pyrsia_registry", "pyrsia_cli"}
                 for m, deps in _external(package).items()}
    offenders = {m: deps for m, deps in offenders.items() if deps}
    assert not offenders, f"plugin modules import the node or the CLI: {offenders}"


@pytest.mark.parametrize("package", ["pyrsia_registry", "pyrsia_cli"])
def test_the_node_and_cli_import_no_package_type(package: str) -> None:
    offenders = {m: {d for d in deps if d.startswith("pyrsia_pkg_")}
                 for m, deps in _external(package).items()}
    offenders = {m: deps for m, deps in offenders.items() if deps}
    assert not offenders, f"{package} imports package-type plugins: {offenders}"
    # The check sees such an import where it is (here: a function-local one).
    probe = ROOT / "tests" / "_imports_probe.py"
    probe.write_text("def f():\n    from pyrsia_pkg_docker._upstream import UpstreamError\n")
    try:
        assert "pyrsia_pkg_docker._upstream" in imports_of(f"{package}._probe", probe)
    finally:
        probe.unlink()
