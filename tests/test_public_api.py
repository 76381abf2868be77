"""The public API is small, typed, documented, and the only thing others import.

Each public module re-exports its names in ``__all__``; the implementation lives in
private (``_``-prefixed) modules behind it. The command line, the plugins and the
examples -- pyrsia's own "other users" -- import public names only, so they show
that the public API suffices to embed, extend and drive a node.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = [
    "pyrsia_core",
    "pyrsia_core.interfaces",
    "pyrsia_core.errors",
    "pyrsia_core.plugins",
    "pyrsia_core.consensus",
    "pyrsia_core.kademlia",
    "pyrsia_core.testing",
    "pyrsia_core.testing.conformance",
    "pyrsia_registry",
    "pyrsia_storage_fs",
    "pyrsia_storage_leveldb",
    "pyrsia_transport_http",
    "pyrsia_transport_quic",
    "pyrsia_pkg_docker",
    "pyrsia_pkg_maven",
    "pyrsia_core.asgi",
]
#: Trees whose code may use only the public API of pyrsia_core and pyrsia_registry.
CLIENT_TREES = ["pyrsia_cli/src", "plugins", "examples"]
_PRIVATE_IMPORT = re.compile(r"^pyrsia_(core|registry)(\.[a-z]+)*\._")


def _isort_key(name: str) -> tuple[int, str]:
    """ruff's order for ``__all__``: CONSTANTS, then Classes, then everything else."""
    if name.isupper() or (name.upper() == name and "_" in name):
        return 0, name
    return (1 if name[:1].isupper() else 2), name


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_complete_sorted_and_resolvable(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    assert list(exported) == sorted(exported, key=_isort_key), f"{name}.__all__ is not sorted"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names {attr}, which is missing"
    star: dict[str, object] = {}
    exec(f"from {name} import *", star)
    assert {k for k in star if k != "__builtins__"} == set(exported)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_names_are_documented_and_typed(name: str) -> None:
    module = importlib.import_module(name)
    assert inspect.getdoc(module), f"{name} has no module docstring"
    undocumented, untyped = [], []
    for attr in module.__all__:
        obj = getattr(module, attr)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not inspect.getdoc(obj):
                undocumented.append(attr)
        if inspect.isfunction(obj):
            hints = obj.__annotations__
            params = [p for p in inspect.signature(obj).parameters.values()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if "return" not in hints or any(p.name not in hints for p in params):
                untyped.append(attr)
    assert not undocumented, f"{name}: no docstring on {undocumented}"
    assert not untyped, f"{name}: missing type hints on {untyped}"


@pytest.mark.parametrize("name", ["pyrsia_core", "pyrsia_registry"])
def test_implementation_lives_in_private_modules(name: str) -> None:
    """Top-level names are re-exported from private modules (or are public modules)."""
    module = importlib.import_module(name)
    for attr in module.__all__:
        obj = getattr(module, attr)
        origin = getattr(obj, "__module__", None)
        if inspect.ismodule(obj):
            assert not obj.__name__.split(".")[-1].startswith("_"), attr
        elif origin is not None and (inspect.isclass(obj) or inspect.isfunction(obj)):
            assert origin.startswith(f"{name}._"), f"{name}.{attr} is defined in {origin}"


def test_every_distribution_is_typed() -> None:
    for package in ["pyrsia_core", "pyrsia_registry", "pyrsia_cli", *PUBLIC_MODULES[9:]]:
        module = importlib.import_module(package)
        assert module.__file__ is not None
        assert (Path(module.__file__).parent / "py.typed").exists(), f"{package} has no py.typed"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return out


def test_cli_plugins_and_examples_use_only_the_public_api() -> None:
    offenders = []
    files = 0
    for tree in CLIENT_TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            files += 1
            for line, module in _imports(path):
                if _PRIVATE_IMPORT.match(module):
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert files > 20
    assert not offenders, "\n".join(offenders)
