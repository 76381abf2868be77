"""The core is pure: it imports no I/O library (DESIGN §3, STYLE rule 1)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pyrsia_core

SRC = Path(pyrsia_core.__file__).parent
FORBIDDEN_IMPORTS = {
    "anyio",
    "asyncio",
    "trio",
    "httpx",
    "httpcore",
    "h11",
    "plyvel",
    "socket",
    "ssl",
    "os",
    "pathlib",
    "shutil",
    "tempfile",
    "io",
    "subprocess",
    "select",
    "selectors",
    "threading",
    "multiprocessing",
    "urllib",
    "http",
    "sqlite3",
    "mmap",
}
FORBIDDEN_CALLS = {"open", "input", "print", "exec", "eval", "__import__"}
# The conformance suites are a test kit for plugin authors (the ``testing`` extra):
# only they may import pytest, hypothesis and anyio (to run concurrent puts).
TEST_KIT = {"testing/conformance.py"}
TEST_KIT_IMPORTS = {"pytest", "hypothesis", "anyio"}


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def test_no_io_imports_or_calls_in_source() -> None:
    problems = []
    for path in _modules():
        rel = path.relative_to(SRC).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if rel in TEST_KIT and top in TEST_KIT_IMPORTS:
                    continue
                if top in FORBIDDEN_IMPORTS:
                    problems.append(f"{rel}:{node.lineno} imports {name}")
                if top in ("pytest", "hypothesis"):
                    problems.append(f"{rel}:{node.lineno} imports {name}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in FORBIDDEN_CALLS
            ):
                problems.append(f"{rel}:{node.lineno} calls {node.func.id}()")
    assert not problems, "\n".join(problems)


def test_importing_the_core_loads_no_io_library() -> None:
    modules = [
        m.name
        for m in pkgutil.walk_packages([str(SRC)], "pyrsia_core.")
        if m.name != "pyrsia_core.testing.conformance"
    ]
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in ('anyio','asyncio','trio','httpx','plyvel','socket','ssl',"
        "'h11','selectors','subprocess') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing pyrsia_core loaded: {out.stdout.strip()}"
    assert len(modules) >= 10


def test_the_checker_catches_an_io_import(tmp_path: Path) -> None:
    # Guard against a vacuous test: the same walk flags a planted import.
    tree = ast.parse("import socket\nfrom anyio import sleep\nopen('x')\n")
    hits = [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        and (getattr(n, "module", None) or n.names[0].name).split(".")[0] in FORBIDDEN_IMPORTS
    ]
    assert len(hits) == 2
