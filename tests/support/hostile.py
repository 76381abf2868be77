"""A hostile upstream registry for tests: a threaded HTTP server on 127.0.0.1 whose answers a
test scripts (lying manifests, huge indexes, slow drips, delays), counting every request.

    with HostileUpstream() as up:
        up.manifest("evil/app", "1", body)              # also served by its digest
        up.blob("evil/app", data)                       # served at /v2/evil/app/blobs/<digest>
        up.route("/v2/evil/app/blobs/sha256:...", handler)  # handler(h: Handler) -> None
        ... up.url ... up.count("/v2/evil/app/manifests/1")

Unknown paths answer 404 with an OCI error body. Handlers run in the server's threads; a
handler that waits uses :meth:`HostileUpstream.sleep`, which returns early once the server
stops, so nothing outlives the test.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .net import LOCALHOST

__all__ = ["DOCKER_CONFIG", "DOCKER_LAYER", "DOCKER_MANIFEST", "Handler", "HostileUpstream",
           "digest_of", "image_manifest"]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_manifest(config: bytes, layers: list[tuple[str, int]], **extra: Any) -> bytes:
    """A Docker v2 image manifest naming ``config`` and ``layers`` ((digest, size) pairs)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": len(config), "digest": digest_of(config)},
        "layers": [{"mediaType": DOCKER_LAYER, "size": size, "digest": digest}
                   for digest, size in layers],
        **extra,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class Handler(BaseHTTPRequestHandler):
    """One request; ``self.upstream`` is the :class:`HostileUpstream`."""

    upstream: HostileUpstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        self.upstream._seen(path)
        route = self.upstream._routes.get(path)
        try:
            if route is not None:
                route(self)
            else:
                self.send_body(404, json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN",
                                                            "message": "unknown"}]}).encode(),
                               "application/json")
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_HEAD = do_GET

    def send_body(self, status: int, body: bytes, media_type: str,
                  headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class HostileUpstream:
    def __init__(self) -> None:
        self._routes: dict[str, Callable[[Handler], None]] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        handler = type("BoundHandler", (Handler,), {"upstream": self})
        self._server = ThreadingHTTPServer((LOCALHOST, 0), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self._server.server_address[1]}"

    def start(self) -> HostileUpstream:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HostileUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sleep(self, seconds: float) -> None:
        """Wait in a handler; returns early when the server stops."""
        self.stopping.wait(seconds)

    # -- scripting ----------------------------------------------------------------------------

    def route(self, path: str, handler: Callable[[Handler], None]) -> None:
        self._routes[path] = handler

    def manifest(self, repo: str, tag: str | None, body: bytes,
                 media_type: str = DOCKER_MANIFEST) -> str:
        """Serve ``body`` as a manifest by ``tag`` (if given) and by its digest."""
        digest = digest_of(body)

        def serve(h: Handler) -> None:
            h.send_body(200, body, media_type, {"Docker-Content-Digest": digest})

        for ref in ([tag] if tag else []) + [digest]:
            self.route(f"/v2/{repo}/manifests/{ref}", serve)
        return digest

    def blob(self, repo: str, data: bytes, *, delay: float = 0.0) -> str:
        digest = digest_of(data)

        def serve(h: Handler) -> None:
            if delay:
                self.sleep(delay)
            h.send_body(200, data, "application/octet-stream", {"Docker-Content-Digest": digest})

        self.route(f"/v2/{repo}/blobs/{digest}", serve)
        return digest

    def image(self, repo: str, tag: str, layers: list[bytes], *,
              config: bytes | None = None) -> str:
        """A whole honest image (config and layers served); returns the manifest digest."""
        config = config if config is not None else json.dumps(
            {"architecture": "amd64", "os": "linux", "repo": repo, "tag": tag}).encode()
        self.blob(repo, config)
        for layer in layers:
            self.blob(repo, layer)
        body = image_manifest(config, [(digest_of(layer), len(layer)) for layer in layers])
        return self.manifest(repo, tag, body)

    # -- what was asked -------------------------------------------------------------------------

    def _seen(self, path: str) -> None:
        with self._lock:
            self._counts[path] += 1

    def count(self, path: str | None = None, *, prefix: str | None = None) -> int:
        with self._lock:
            if path is not None:
                return self._counts[path]
            return sum(n for p, n in self._counts.items()
                       if prefix is None or p.startswith(prefix))


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False
