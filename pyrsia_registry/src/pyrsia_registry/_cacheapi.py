"""The node API's cache routes (``pyrsia cache list|prune``).

* ``GET /api/cache``: the stored blobs, least recently used first: ``digest``, ``size``,
  ``last_used`` (UNIX seconds) and ``packages`` (the package ids whose log records name
  the digest), with ``disk_usage`` and ``disk_allocated``.
* ``POST /api/cache/prune`` (admin token): body ``{"bytes": N}``, ``{"all": true}`` or
  ``{"older_than": SECONDS}``; evicts least-recently-used blobs and returns them. Every
  stored blob is in the log, so a pruned one is fetched again when next asked for.
* ``POST /api/cache/verify``: body ``{"digest": "sha256:..."}``: a client that got bytes
  that do not match reports it; the stored copy is hashed again (at most every 30 s per
  digest) and quarantined if damaged.
"""

from __future__ import annotations

from typing import Any, Final

from pyrsia_core.errors import DigestError, EncodingError

from pyrsia_core import Digest, canonical_loads

from ._apiguard import json_problem
from ._asgi import Receive, Scope, Send, read_body, send_json

__all__ = ["cache_route"]

#: Blobs listed by ``GET /api/cache`` at most (the least recently used first).
MAX_LISTED: Final = 10_000


async def cache_route(api: Any, scope: Scope, receive: Receive, send: Send,
                      rest: list[str]) -> None:
    method = scope["method"]
    if rest == [] and method == "GET":
        await send_json(send, 200, await _listing(api.node))
    elif rest in (["prune"], ["verify"]) and method == "POST" and json_problem(scope):
        await send_json(send, 415, {"error": json_problem(scope)})
    elif rest == ["prune"] and method == "POST":
        if not api._authorized(scope):
            await send_json(send, 401, {"error": "prune needs the node's admin token "
                                        "(Authorization: Bearer <token>; the token is in the "
                                        "node's data directory, admin.token)"})
            return
        body = await _body(receive, send)
        if body is not None:
            await _prune(api.node, body, send)
    elif rest == ["verify"] and method == "POST":
        body = await _body(receive, send)
        if body is not None:
            await _verify(api.node, body, send)
    elif rest in ([], ["prune"], ["verify"]):
        await send_json(send, 405, {"error": f"{method} is not allowed on /api/cache"
                                    f"{'/' + rest[0] if rest else ''}"})
    else:
        await send_json(send, 404, {"error": f"no route for /api/cache/{'/'.join(rest)[:200]}"})


async def _body(receive: Receive, send: Send) -> dict[str, Any] | None:
    try:
        body: Any = canonical_loads(await read_body(receive, 64 * 1024) or b"{}")
    except (EncodingError, ValueError) as exc:
        await send_json(send, 400, {"error": f"request body must be a JSON object: {exc}"})
        return None
    if not isinstance(body, dict):
        await send_json(send, 400, {"error": "request body must be a JSON object"})
        return None
    return body


async def _listing(node: Any) -> dict[str, Any]:
    entries = await node.cache_entries()
    blobs = []
    for digest, size, used in entries[:MAX_LISTED]:
        packages = sorted({rec.signed.record.package_specific_id
                           for rec in await node.records_for_artifact(digest)})
        blobs.append({"digest": str(digest), "size": size,
                      "last_used": None if used is None else int(used), "packages": packages})
    return {"blobs": blobs, "count": len(entries), "listed": len(blobs),
            "disk_usage": await node.blobs.usage(), "disk_allocated": node.config.disk_space}


def _number(body: dict[str, Any], key: str) -> int | float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{key} must be a number >= 0")
    return value


async def _prune(node: Any, body: dict[str, Any], send: Send) -> None:
    try:
        nbytes = _number(body, "bytes")
        older = _number(body, "older_than")
        everything = body.get("all") is True
        if sum(x is not None and x is not False for x in (nbytes, older, everything or None)) != 1:
            raise ValueError('give exactly one of {"bytes": N}, {"all": true} or '
                             '{"older_than": SECONDS}')
    except ValueError as exc:
        await send_json(send, 400, {"error": str(exc)})
        return
    removed = await node.prune_cache(bytes_=None if nbytes is None else int(nbytes),
                                     everything=everything, older_than=older)
    await send_json(send, 200, {
        "removed": [{"digest": str(d), "size": size} for d, size in removed],
        "removed_bytes": sum(size for _, size in removed),
        "disk_usage": await node.blobs.usage(),
    })


async def _verify(node: Any, body: dict[str, Any], send: Send) -> None:
    try:
        digest = Digest.parse(str(body.get("digest", "")))
    except DigestError as exc:
        await send_json(send, 400, {"error": f"digest: {exc}"})
        return
    if await node.blobs.stat(digest) is None:
        await send_json(send, 404, {"error": f"{digest} is not stored here"})
        return
    good = await node.report_mismatch(digest)
    await send_json(send, 200, {"digest": str(digest), "stored": good,
                                "result": "verified" if good else "damaged: quarantined"})
