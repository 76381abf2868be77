"""A read-only Maven-layout upstream on 127.0.0.1 for tests, and helpers to fill one."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .net import free_port

__all__ = ["MavenRepoServer", "maven_upstream", "write_gav"]


class MavenRepoServer:
    """Serves files from ``roots`` (first match wins), read-only; counts every request."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = [Path(r).resolve() for r in roots]
        self.port = free_port()
        self.requests: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests.append(path)
                data = server.read(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def read(self, path: str) -> bytes | None:
        rel = path.lstrip("/")
        if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
            return None
        for root in self.roots:
            file = (root / rel).resolve()
            # Stay inside the root (a symlink out of it, e.g. Debian's jars, is allowed
            # only when it points to a regular file).
            if file.is_file() and os.access(file, os.R_OK):
                return file.read_bytes()
        return None

    def count(self, suffix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.endswith(suffix))

    def start(self) -> MavenRepoServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@contextmanager
def maven_upstream(*roots: Path) -> Iterator[MavenRepoServer]:
    server = MavenRepoServer(roots).start()
    try:
        yield server
    finally:
        server.stop()


def _jar(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("META-INF/MANIFEST.MF", date_time=(2020, 1, 1, 0, 0, 0))
        zf.writestr(info, "Manifest-Version: 1.0\n")
        info = zipfile.ZipInfo(f"{name}.txt", date_time=(2020, 1, 1, 0, 0, 0))
        zf.writestr(info, f"{name}\n" * 100)
    return buf.getvalue()


def write_gav(
    root: Path,
    group: str,
    artifact: str,
    version: str,
    *,
    packaging: str = "jar",
    jar: bool = True,
    sha1: bool = False,
) -> dict[str, bytes]:
    """Write a GAV's POM (and jar) into a Maven-layout directory; returns path -> bytes."""
    directory = root / group.replace(".", "/") / artifact / version
    directory.mkdir(parents=True, exist_ok=True)
    base = f"{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}"
    pom = (f'<?xml version="1.0" encoding="UTF-8"?>\n'
           f'<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
           f"  <modelVersion>4.0.0</modelVersion>\n  <groupId>{group}</groupId>\n"
           f"  <artifactId>{artifact}</artifactId>\n  <version>{version}</version>\n"
           f"  <packaging>{packaging}</packaging>\n</project>\n").encode()
    files = {f"{base}.pom": pom}
    if jar and packaging != "pom":
        files[f"{base}.jar"] = _jar(f"{artifact}-{version}")
    for path, data in list(files.items()):
        (root / path).write_bytes(data)
        if sha1:
            (root / f"{path}.sha1").write_text(hashlib.sha1(data).hexdigest() + "\n")
    return files
