"""A real ``pyrsia node start`` process on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from .net import free_port, wait_for_http

__all__ = ["NodeProcess", "node_status", "run_cli", "wait_until"]


def cli_env(home: Path, port: int | None = None) -> dict[str, str]:
    """Environment for the CLI: its own config dir, pointing at ``port``."""
    env = dict(os.environ)
    env["XDG_CONFIG_HOME"] = str(home / "config")
    env["PYRSIA_CLI_CONFIG"] = str(home / "config" / "pyrsia" / "cli.json")
    env["XDG_DATA_HOME"] = str(home / "share")  # the default data dir: never the user's
    for name in ("PYRSIA_HOME", "PYRSIA_NODE", "PYRSIA_UPSTREAM"):
        env.pop(name, None)
    if port is not None:
        cfg = home / "config" / "pyrsia" / "cli.json"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f'{{"host": "127.0.0.1", "port": {port}, "disk_allocated": "10 GB"}}\n')
    return env


def run_cli(
    home: Path,
    *args: str,
    port: int | None = None,
    input: str | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``pyrsia ARGS`` as a user would, with the CLI config under ``home``."""
    e = cli_env(home, port)
    if env:
        e.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pyrsia_cli", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        env=e,
    )


class NodeProcess:
    """``pyrsia node start`` in a subprocess; logs go to ``log_path``."""

    def __init__(
        self,
        workdir: Path,
        *,
        upstream: str | None = None,
        port: int | None = None,
        data_dir: Path | None = None,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        python: str | None = None,
    ) -> None:
        self.workdir = workdir
        #: The interpreter running the node (another environment's, e.g. one without a
        #: plugin installed); this one by default.
        self.python = python or sys.executable
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.data_dir = data_dir or workdir / "data"
        self.upstream = upstream
        self.extra = extra
        self.env = env or {}
        self.log_path = workdir / f"node-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> NodeProcess:
        args = [
            self.python,
            "-m",
            "pyrsia_cli",
            "node",
            "start",
            "-H",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        if self.upstream:
            args += ["--upstream", self.upstream]
        else:
            args += ["--no-upstream"]
        args += list(self.extra)
        env = dict(os.environ)
        env.update(self.env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_http(f"{self.url}/api/ping", timeout, process=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"node did not start:\n{self.log()}") from None
        return self

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kwargs)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(what: str, check: Any, timeout: float = 60.0) -> None:
    """Poll ``check()`` until it is true; fail the test with ``what`` after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def node_status(node: NodeProcess) -> dict[str, Any]:
    """The node's ``/api/status`` JSON."""
    return httpx.get(f"{node.url}/api/status", timeout=60).json()  # type: ignore[no-any-return]
