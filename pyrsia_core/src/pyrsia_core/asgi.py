"""Small ASGI helpers: what the node's APIs and package-type plugins' apps share.

No framework and no I/O library: each helper only builds ASGI messages (the server
does the I/O). ``send_file`` uses the node server's zero-copy ``pyrsia.sendfile``
extension when the scope offers it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any

__all__ = [
    "ASGIApp",
    "Receive",
    "Scope",
    "Send",
    "header_values",
    "lifespan",
    "read_body",
    "route_path",
    "send_bytes",
    "send_file",
    "send_json",
    "send_stream",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Iterable[tuple[str, str]]
MAX_BODY = 1024 * 1024


def route_path(scope: Scope) -> str:
    """The path below the app's mount point (``root_path``)."""
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def header_values(scope: Scope, name: str) -> list[str]:
    """Every value of header ``name`` (clients may send the same header on several lines)."""
    key = name.lower().encode("latin-1")
    return [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == key]


def _raw_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def read_body(receive: Receive, limit: int = MAX_BODY) -> bytes:
    """The request body, or ``ValueError`` if it is larger than ``limit``."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise ValueError(f"request body is larger than {limit} bytes")
        parts.append(body)
        if not message.get("more_body", False):
            return b"".join(parts)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: Headers = (),
    *,
    content_type: str | None = None,
    head: bool = False,
) -> None:
    """A whole response with ``body`` (and its length); headers only for ``head``."""
    hdrs = list(headers)
    if content_type is not None:
        hdrs.append(("content-type", content_type))
    hdrs.append(("content-length", str(len(body))))
    await send({"type": "http.response.start", "status": status, "headers": _raw_headers(hdrs)})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def send_json(
    send: Send, status: int, obj: Any, headers: Headers = (), *, head: bool = False
) -> None:
    """A JSON response (indented, newline-terminated)."""
    body = json.dumps(obj, indent=2).encode() + b"\n"
    await send_bytes(send, status, body, headers, content_type="application/json", head=head)


async def send_stream(
    send: Send, status: int, chunks: AsyncIterator[bytes], headers: Headers
) -> None:
    """A response streamed from ``chunks`` (headers must carry the length)."""
    await send({"type": "http.response.start", "status": status, "headers": _raw_headers(headers)})
    async for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def send_file(
    scope: Scope,
    send: Send,
    status: int,
    headers: Headers,
    *,
    path: str,
    offset: int,
    count: int,
    size: int,
    fallback: Callable[[], AsyncIterator[bytes]],
) -> None:
    """Send ``count`` bytes of a file at ``offset`` with zero copy when the server can.

    Uses pyrsia's ``pyrsia.sendfile`` extension (any range), else the standard
    ``http.response.pathsend`` (whole file only), else streams ``fallback()``.
    """
    extensions = scope.get("extensions") or {}
    if "pyrsia.sendfile" in extensions:
        await send({"type": "http.response.start", "status": status,
                    "headers": _raw_headers(headers)})
        await send({"type": "pyrsia.sendfile", "path": path, "offset": offset, "count": count})
        return
    if "http.response.pathsend" in extensions and offset == 0 and count == size:
        await send({"type": "http.response.start", "status": status,
                    "headers": _raw_headers(headers)})
        await send({"type": "http.response.pathsend", "path": path})
        return
    await send_stream(send, status, fallback(), headers)


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer the ASGI lifespan protocol for an app with nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
