"""One entry point for the checks: ``nox -s tests lint typecheck``, and ``nox -s bench``."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck"]

PYTHON = "3.11"
DISTRIBUTIONS = [
    "./pyrsia_core[testing]",
    "./plugins/pyrsia-storage-fs",
    "./plugins/pyrsia-storage-leveldb",
    "./plugins/pyrsia-pkg-docker",
    "./plugins/pyrsia-pkg-maven",
    "./plugins/pyrsia-transport-http",
    "./plugins/pyrsia-transport-quic",
    "./pyrsia_registry",
    "./pyrsia_cli",
]
TEST_DEPS = ["pytest>=8", "pytest-timeout", "hypothesis>=6", "anyio>=4", "httpx>=0.27",
             "pyyaml", "starlette", "uvicorn", "hatchling", "selenium>=4.10", "grpcio"]


def _install(session: nox.Session) -> None:
    editable: list[str] = []
    for dist in DISTRIBUTIONS:
        editable += ["-e", dist]
    session.install(*editable, *TEST_DEPS)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Every test: the core, the plugins' conformance, and real processes."""
    _install(session)
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


#: The import package of each distribution, for ``mypy --strict -p``.
PACKAGES = ["pyrsia_core", "pyrsia_storage_fs", "pyrsia_storage_leveldb", "pyrsia_pkg_docker",
            "pyrsia_pkg_maven", "pyrsia_transport_http", "pyrsia_transport_quic",
            "pyrsia_registry", "pyrsia_cli"]


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on every distribution: the core, the node, the CLI and each plugin."""
    _install(session)
    session.install("mypy")
    args: list[str] = []
    for package in PACKAGES:
        args += ["-p", package]
    session.run("mypy", "--strict", *args)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks; each prints ratios against a baseline measured in the same run."""
    _install(session)
    session.install("uvicorn")
    args = session.posargs or []
    session.run("python", "bench/bench_log.py", *args)
    session.run("python", "bench/bench_serve.py")
    # Cold pulls (issue #14): 100 MiB x 3 and 1 GiB x 1 through a fresh node vs the
    # upstream direct; from a peer vs that peer's cache; 16 clients at once; memory.
    session.run("python", "bench/bench_pull.py", "--image", "100x3", "--image", "1024x1")
    session.run("python", "bench/bench_peer_pull.py")
    session.run("python", "bench/bench_concurrent_pull.py")
    session.run("python", "bench/bench_concurrent_pull.py", "--upstream-rate", "50MB/s")
    session.run("python", "bench/bench_stream_memory.py")
    session.run("python", "bench/bench_p2p.py")
    session.run("python", "bench/bench_swarm.py")
    session.run("python", "bench/bench_quic.py")
    session.run("python", "bench/bench_consensus.py")
    session.run("python", "bench/bench_witness.py")
    session.run("python", "bench/sim_kademlia.py")
    session.run("python", "bench/sim_consensus.py", "--seeds", "10000")
