"""What a node did lately, for its status page (``/api/activity``) and ``/metrics``.

One :class:`Activity` per node (``node.activity``): plain counters and short recent-event
lists, updated by small hooks (a request answered, a blob fetched, a verification failure,
an eviction, an upload that waited for the rate limit). Everything runs on the node's event
loop, so no locks; a request costs a few additions, never work per chunk.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from typing import Any

from pyrsia_core import provenance

from ._asgi import Receive, Scope, Send, route_path

__all__ = ["LATENCY_BUCKETS", "Activity", "metered"]

#: Upper bounds (seconds) of the pull latency histogram's buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Recent pulls and verification failures kept for the status page.
KEEP_PULLS = 50
KEEP_FAILURES = 50


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "none"


class Activity:
    """A node's recent activity and counters (see the module docstring)."""

    def __init__(self) -> None:
        self.pulls: deque[dict[str, Any]] = deque(maxlen=KEEP_PULLS)
        self.failures: deque[dict[str, Any]] = deque(maxlen=KEEP_FAILURES)
        self.seq = 0  # bumped by every recorded pull or failure (the page polls for it)
        #: (mount, method, status class, source) -> requests
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.served_bytes: dict[str, int] = {}  # source -> bytes sent to clients
        self.fetched_bytes: dict[str, int] = {}  # source -> bytes fetched for requests
        #: mount -> (bucket counts, sum of seconds, count)
        self.latency: dict[str, list[Any]] = {}
        self.verification_failures: dict[str, int] = {}  # reason -> failures
        self.upload_waits = 0
        self.upload_wait_seconds = 0.0
        self.upload_bytes = 0  # bytes of blob responses opened for peers
        self.evictions = 0
        self.evicted_bytes = 0
        #: The node's Prometheus registry and collector (made by ``_metrics`` on first use).
        self.registry: Any = None
        self.collector: Any = None

    # -- hooks -----------------------------------------------------------------------

    def fetched(self, kind: str, size: int) -> None:
        self.fetched_bytes[kind] = self.fetched_bytes.get(kind, 0) + size

    def answered(self, mount: str, method: str, path: str, status: int, size: int,
                 seconds: float, pull: provenance.Pull) -> None:
        """A request to a package mount was answered (``size`` body bytes)."""
        kind = pull.kind
        key = (mount, method, _status_class(status), kind)
        self.requests[key] = self.requests.get(key, 0) + 1
        if size:
            self.served_bytes[kind] = self.served_bytes.get(kind, 0) + size
        hist = self.latency.get(mount)
        if hist is None:
            hist = self.latency[mount] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0, 0]
        hist[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist[1] += seconds
        hist[2] += 1
        if path in ("/v2", "/v2/") or method not in ("GET", "HEAD"):
            return  # the registry ping, refused pushes: not pulls
        self.seq += 1
        self.pulls.append({
            "seq": self.seq, "time": time.time(), "method": method, "path": path[:300],
            "status": status, "bytes": size, "seconds": round(seconds, 4),
            "source": kind, "source_detail": pull.detail[:300],
        })

    def failure(self, reason: str, blamed: str, detail: str, digest: str = "") -> None:
        """A verification failure: ``reason`` (a metric label), who is ``blamed``."""
        self.verification_failures[reason] = self.verification_failures.get(reason, 0) + 1
        self.seq += 1
        self.failures.append({"seq": self.seq, "time": time.time(), "reason": reason,
                              "blamed": blamed[:200], "detail": detail[:500],
                              "digest": digest[:80]})

    def upload_waited(self, seconds: float) -> None:
        self.upload_waits += 1
        self.upload_wait_seconds += seconds

    def uploading(self, size: int) -> None:
        self.upload_bytes += size

    def evicted(self, size: int) -> None:
        self.evictions += 1
        self.evicted_bytes += size


async def metered(activity: Activity, mount: str, app: Any, scope: Scope, receive: Receive,
                  send: Send) -> None:
    """Run ``app`` for a request to ``mount``, counting it in ``activity`` when answered:
    status, body bytes (from ``content-length``; summed only for responses without one),
    duration and where the artifact came from (:mod:`pyrsia_core.provenance`)."""
    started = time.perf_counter()
    status = 0
    size = -1  # -1: no content-length seen yet
    head = scope.get("method") == "HEAD"

    async def counting_send(message: Any) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
            for key, value in message.get("headers") or ():
                if key == b"content-length":
                    size = int(value)
                    break
        elif size < 0 and message["type"] == "http.response.body":
            size -= len(message.get("body", b""))  # summed, kept negative
        await send(message)

    pull = provenance.Pull(activity.fetched)
    token = provenance.begin(pull)
    try:
        await app(scope, receive, counting_send)
    finally:
        provenance.end(token)
        body = 0 if head else (size if size >= 0 else -1 - size)
        # The app sees its mount as root_path: the path the client asked is below it.
        activity.answered(mount, scope.get("method", ""), mount + route_path(scope), status, body,
                          time.perf_counter() - started, pull)
