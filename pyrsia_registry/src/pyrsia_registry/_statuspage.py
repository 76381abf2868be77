"""The node's web status page at ``/`` (read-only, live, no external assets).

``/`` is a small HTML page; its script (``/ui/status.js``) and style (``/ui/status.css``)
are served by the node, and it polls ``/api/status`` and ``/api/activity`` every second.
Links use the app's ``root_path``, so the page works where the node's app is mounted. The
page holds no secrets and offers no action: it only reads. ``/api/activity`` answers like
the node API (the same Host rule), with recent pulls and their sources, peers with their
transfer figures, builds and verification failures.
"""

from __future__ import annotations

import html
from importlib import resources
from typing import Any

from ._activity import Activity
from ._apiguard import api_request_problem
from ._asgi import Receive, Scope, Send, send_bytes, send_json
from ._health import readiness
from ._metrics import build_states

__all__ = ["STATUS_PATHS", "activity_json", "status_page"]

_STATIC = {
    "/ui/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/ui/status.css": ("status.css", "text/css; charset=utf-8"),
}
STATUS_PATHS = frozenset({"/", "/api/activity", *_STATIC})
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = [("cache-control", "no-store"), ("x-content-type-options", "nosniff"),
            ("content-security-policy", _CSP), ("referrer-policy", "no-referrer")]
_files: dict[str, bytes] = {}


def _file(name: str) -> bytes:
    data = _files.get(name)
    if data is None:
        data = _files[name] = resources.files(__package__).joinpath("_static", name).read_bytes()
    return data


async def status_page(node: Any, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    head = scope["method"] == "HEAD"
    if scope["method"] not in ("GET", "HEAD"):
        await send_json(send, 405, {"error": f"{scope['method']} is not supported"},
                        [("allow", "GET, HEAD")], head=head)
        return
    if path == "/api/activity":
        config = node.config
        problem = api_request_problem(scope, listen_host=config.host,
                                      allowed=config.allowed_hosts)
        if problem is not None:
            await send_json(send, problem[0], {"error": problem[1]}, head=head)
            return
        await send_json(send, 200, await activity_json(node), [("cache-control", "no-store")],
                        head=head)
        return
    if path == "/":
        root = html.escape(scope.get("root_path", "").rstrip("/"), quote=True)
        body = _file("status.html").decode().replace("{root}", root).encode()
        await send_bytes(send, 200, body, _HEADERS, content_type="text/html; charset=utf-8",
                         head=head)
        return
    name, content_type = _STATIC[path]
    await send_bytes(send, 200, _file(name), _HEADERS, content_type=content_type, head=head)


async def activity_json(node: Any) -> dict[str, Any]:
    """What the status page shows besides ``/api/status``."""
    act: Activity = node.activity
    ready, details = await readiness(node)
    peers_out: list[dict[str, Any]] = []
    peers = node.peers
    if peers is not None:
        for p in peers.peers():
            st = peers.stats.get(p["node_id"])
            peers_out.append({
                **p,
                "transport": p["address"].partition("://")[0] or "?",
                "bytes_in": st.bytes_in if st is not None else 0,
                "throughput": round(st.throughput) if st is not None else 0,
                "misbehaved": st.misbehaved if st is not None else 0,
            })
    states = build_states(node)
    recent = sorted(node.builds.values(), key=lambda b: b.started, reverse=True)[:20]
    consensus = None
    stall = node.consensus.stall() if node.consensus is not None else None
    if stall is not None:
        consensus = stall.get("reason")
    return {
        "seq": act.seq,
        "sync": {"ready": ready, "reason": details.get("reason", "")},
        "consensus": consensus,
        "pulls": list(reversed(act.pulls)),
        "failures": list(reversed(act.failures)),
        "peers": peers_out,
        "uploads": {"bytes": act.upload_bytes, "waits": act.upload_waits},
        "builds": {"running": states["RUNNING"], "queued": states["QUEUED"],
                   "waiting_for_quorum": states["WAITING_FOR_QUORUM"],
                   "recent": [node.build_json(b) for b in recent]},
    }
