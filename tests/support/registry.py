"""A real upstream registry for tests: Debian's ``docker-registry`` (CNCF distribution 2.8).

Each :class:`UpstreamRegistry` runs ``/usr/bin/docker-registry serve <config>`` with its own temp
config (never the packaged one, which enables htpasswd auth), listening on 127.0.0.1 only, with
filesystem storage in a temp dir and the access log on. stdout and stderr go to one log file.

The access log uses the Apache combined format, one line per request, e.g.::

    127.0.0.1 - - [28/Nov/2026:05:03:21 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"

interleaved with logrus lines (``time="..." level=info msg="response completed" ...``) that we
skip. A test takes ``mark = reg.mark()`` then, after its client is done,
``reg.requests_since(mark)`` -> ``[("GET", "/v2/library/alpine/manifests/3.16.2", 200), ...]``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from .net import LOCALHOST, ServerDiedError, free_port, wait_for_http

__all__ = ["REGISTRY_BINARY", "AccessLogEntry", "UpstreamRegistry", "parse_access_line"]

REGISTRY_BINARY = "/usr/bin/docker-registry"
SYNC_PATH = "/pyrsia-test-log-sync/"

_ACCESS_RE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" '
    r'(?P<status>\d{3}) (?P<size>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"$'
)


@dataclass(frozen=True)
class AccessLogEntry:
    """One request as the registry's access log recorded it."""

    remote: str
    time: str
    method: str
    uri: str  # path with the query string, as sent
    status: int
    size: int
    user_agent: str

    @property
    def path(self) -> str:
        """The request path without the query string."""
        return self.uri.partition("?")[0]

    @property
    def query(self) -> str:
        return self.uri.partition("?")[2]

    def as_tuple(self) -> tuple[str, str, int]:
        return (self.method, self.path, self.status)


def parse_access_line(line: str) -> AccessLogEntry | None:
    """Parse one combined-format access-log line; ``None`` for any other log line."""
    m = _ACCESS_RE.match(line.rstrip("\n"))
    if m is None:
        return None
    size = m["size"]
    return AccessLogEntry(
        remote=m["remote"],
        time=m["time"],
        method=m["method"],
        uri=m["uri"],
        status=int(m["status"]),
        size=0 if size == "-" else int(size),
        user_agent=m["agent"],
    )


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class UpstreamRegistry:
    """A ``docker-registry`` subprocess on ``127.0.0.1:<free port>`` with no auth.

    ``UpstreamRegistry()`` starts nothing; :meth:`start` (or ``with``) does. ``stop()`` then
    ``start()`` again restarts it on the same port with the same storage, so a test can take the
    upstream away and bring it back. ``storage_dir`` may be shared with another registry process
    (e.g. :class:`support.tokenauth.TokenAuthRegistry` serves the content of an open one).

    ``extra_config`` is deep-merged into the generated config (a dict; written as JSON, which
    is valid YAML).
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        storage_dir: Path | str | None = None,
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        self._own_workdir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="pyrsia-upstream-")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = Path(storage_dir) if storage_dir is not None else self.workdir / "data"
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self._fixed_port = port
        self._port: int | None = None
        self._extra_config = dict(extra_config or {})
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._sync_counter = 0

    # -- lifecycle -------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The registry configuration this instance runs with (before it is written)."""
        base: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"{LOCALHOST}:{self.port}",
                "secret": "pyrsia-test-not-a-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        return _deep_merge(base, self._extra_config)

    def start(self) -> UpstreamRegistry:
        """Start the process and wait until ``GET /v2/`` answers. Retries on a port clash."""
        if self.running:
            return self
        attempts = 1 if (self._fixed_port is not None or self._port is not None) else 3
        last: Exception | None = None
        for _ in range(attempts):
            if self._port is None:
                self._port = self._fixed_port if self._fixed_port is not None else free_port()
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            log = open(self.log_path, "ab")  # the child inherits it; closed below
            try:
                self._proc = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                    start_new_session=True,
                )
            finally:
                log.close()
            try:
                wait_for_http(f"{self.url}/v2/", self._start_timeout, process=self._proc)
                return self
            except (ServerDiedError, TimeoutError) as exc:
                last = exc
                self._kill()
                if self._fixed_port is None:
                    self._port = None  # probably lost the free-port race: try another
        raise RuntimeError(f"docker-registry did not start: {last}\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL). Storage and port are kept for a restart."""
        self._kill(timeout)

    def _kill(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def close(self) -> None:
        """Stop, and remove the work dir if this instance created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> UpstreamRegistry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- addresses -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = self._fixed_port if self._fixed_port is not None else free_port()
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the form skopeo/podman image references use."""
        return f"{LOCALHOST}:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    # -- logs ------------------------------------------------------------------------------

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    def _sync_log(self, timeout: float = 5.0) -> int:
        """Make a sentinel request and wait until its access line is in the log.

        The registry writes an access line after the response has been sent, so a client may
        see its answer a moment before the line exists. Lines of requests whose answers we
        already saw are written before the sentinel is even handled. Returns the log size
        just after the sentinel line.
        """
        if not self.running:
            return self._log_size()
        self._sync_counter += 1
        token = f"{SYNC_PATH}{os.getpid()}-{id(self)}-{self._sync_counter}"
        httpx.get(self.url + token, timeout=5.0, trust_env=False)
        needle = f" {token} ".encode()
        deadline = time.monotonic() + timeout
        while True:
            data = self.log_path.read_bytes()
            pos = data.find(needle)
            if pos >= 0:
                end = data.find(b"\n", pos)
                return len(data) if end < 0 else end + 1
            if time.monotonic() >= deadline:
                raise TimeoutError(f"access log line for {token} never appeared")
            time.sleep(0.01)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def mark(self) -> int:
        """A position in the log: every request answered before this call lies before it."""
        return self._sync_log()

    def access_log(self, since: int = 0, *, sync: bool = True) -> list[AccessLogEntry]:
        """Parsed access-log entries after position ``since`` (from :meth:`mark`).

        With ``sync`` (default) first waits until every request answered so far is logged.
        The sentinel requests used for that are left out.
        """
        end = self._sync_log() if sync else self._log_size()
        with open(self.log_path, "rb") as f:
            f.seek(since)
            data = f.read(max(0, end - since))
        out: list[AccessLogEntry] = []
        for raw in data.decode(errors="replace").splitlines():
            entry = parse_access_line(raw)
            if entry is not None and not entry.path.startswith(SYNC_PATH):
                out.append(entry)
        return out

    def access_log_lines(self, since: int = 0) -> list[str]:
        """The raw access-log lines (combined format) after ``since``, sentinels left out."""
        end = self._sync_log()
        with open(self.log_path, "rb") as f:
            f.seek(since)
            data = f.read(max(0, end - since))
        return [
            line
            for line in data.decode(errors="replace").splitlines()
            if (e := parse_access_line(line)) is not None and not e.path.startswith(SYNC_PATH)
        ]

    def requests(self, since: int = 0) -> list[tuple[str, str, int]]:
        """``(method, path without query, status)`` for each request after ``since``."""
        return [e.as_tuple() for e in self.access_log(since)]

    def requests_since(self, mark: int) -> list[tuple[str, str, int]]:
        """Same as ``requests(since=mark)``."""
        return self.requests(mark)

    def blob_fetches_since(self, mark: int) -> list[str]:
        """Paths of ``GET /v2/.../blobs/<digest>`` requests after ``mark`` (any status)."""
        return [
            path
            for method, path, _ in self.requests(mark)
            if method == "GET" and "/blobs/" in path and "/blobs/uploads" not in path
        ]

    def manifest_fetches_since(self, mark: int) -> list[tuple[str, str, int]]:
        """``GET``/``HEAD`` of ``/v2/.../manifests/<ref>`` after ``mark``."""
        return [r for r in self.requests(mark) if r[0] in ("GET", "HEAD") and "/manifests/" in r[1]]
