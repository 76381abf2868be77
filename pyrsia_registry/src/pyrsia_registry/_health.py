"""``/healthz`` and ``/readyz``: the answers a Kubernetes liveness and readiness probe expect.

* ``/healthz``: the process serves HTTP: ``200 {"status": "ok"}``.
* ``/readyz``: ``200 {"status": "ready", ...}`` when the node can answer pulls correctly: its
  stores are open (and answer a read), its first bootstrap is over, a configured peer has
  answered, and no peer reported a higher ledger height in the last sync round than the node
  has now. Otherwise ``503 {"status": "not ready", "reason": ...}``.
"""

from __future__ import annotations

from typing import Any

from ._asgi import Receive, Scope, Send, send_json

__all__ = ["HEALTH_PATHS", "health", "readiness"]

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
_PROBE_KEY = b"\x00pyrsia-readyz-probe"


async def readiness(node: Any) -> tuple[bool, dict[str, Any]]:
    """``(ready, details)``; ``details["reason"]`` says why a node is not ready."""
    ledger = node.log_store.ledger
    details: dict[str, Any] = {"ledger_height": ledger.height}

    def not_ready(reason: str) -> tuple[bool, dict[str, Any]]:
        return False, {"status": "not ready", "reason": reason, **details}

    if node.kv.closed or node.blobs.closed:
        return not_ready("the node's stores are closed (it is stopping)")
    try:
        await node.kv.get(_PROBE_KEY)
    except Exception as exc:  # any store failure makes the node unready, never a 500
        return not_ready(f"the key-value store does not answer: {exc}")
    peers = node.peers
    if peers is not None:
        details["peers"] = len(peers.stats)
        config = peers.config
        if not config.listen_only and not peers.bootstrapped:
            return not_ready("bootstrap has not finished (meeting peers, syncing the ledger)")
        if config.peers and not config.listen_only and not peers.stats:
            return not_ready("none of the configured peers (" + ", ".join(config.peers)
                             + ") has answered yet")
        ahead = {nid: h for nid, h in peers.last_heads.items() if h > ledger.height}
        if ahead:
            top = max(ahead.values())
            return not_ready(
                f"the ledger is behind: height {ledger.height}, peer(s) "
                + ", ".join(nid[:16] for nid in sorted(ahead)) + f" reported {top}; syncing")
    return True, {"status": "ready", **details}


async def health(node: Any, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    head = scope["method"] == "HEAD"
    headers = [("cache-control", "no-store")]
    if scope["method"] not in ("GET", "HEAD"):
        await send_json(send, 405, {"error": f"{scope['method']} is not supported"},
                        [*headers, ("allow", "GET, HEAD")], head=head)
        return
    if path == "/healthz":
        await send_json(send, 200, {"status": "ok"}, headers, head=head)
        return
    ready, details = await readiness(node)
    await send_json(send, 200 if ready else 503, details, headers, head=head)
