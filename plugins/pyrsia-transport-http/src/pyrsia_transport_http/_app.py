"""The serving side: an ASGI app the node mounts at ``/p2p`` on its own HTTP port.

Routes (relative to the mount point):

* ``POST /rpc``: the request body is one core-encoded frame (at most ``max_frame_size``
  bytes, else ``413``); the handler's reply is the ``200`` body. A handler exception is a
  ``500`` with a short text (logged on ``pyrsia.transport.http``).
* ``GET|HEAD /blobs/sha256:<hex>``: the blob, or its tail with ``Range: bytes=N-``, or
  bytes ``N`` to ``M`` with ``Range: bytes=N-M`` (``206`` + ``Content-Range``; ``416`` +
  ``Content-Range: bytes */size`` when ``N`` is not below the size or ``M < N``). Other
  ``Range`` forms are ignored (the whole blob, ``200``). ``404`` when
  the node's :data:`~pyrsia_core.interfaces.BlobSource` returns ``None``.

The app works when mounted (the path is read relative to ``scope["root_path"]``) and when
called with the full ``/p2p/...`` path and an empty root path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Final

import anyio
from pyrsia_core.asgi import lifespan
from pyrsia_core.errors import DigestError
from pyrsia_core.interfaces import BlobSource, PeerBlob, RequestHandler, served_blob_problem

from pyrsia_core import Digest

from ._limits import MAX_FRAME_SIZE, PREFIX, SENDFILE

__all__ = ["PeerApp"]

logger = logging.getLogger("pyrsia.transport.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_RANGE: Final = re.compile(r"\s*bytes\s*=\s*(\d{1,19})\s*-\s*(\d{1,19})?\s*", re.ASCII)
_OCTETS: Final = (b"content-type", b"application/octet-stream")


class BlobSourceError(RuntimeError):
    """The node's blob source broke its contract (wrong size, wrong offset, failed body).

    Raised out of the ASGI app so that the server cuts the connection: the peer then sees
    a short body, never a wrong one.
    """


class PeerApp:
    """ASGI 3 app serving peers: frames to ``handler``, blob fetches from ``blobs``."""

    def __init__(
        self,
        handler: RequestHandler,
        blobs: BlobSource,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> None:
        self.handler = handler
        self.blobs = blobs
        self.max_frame_size = max_frame_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_frame_size={self.max_frame_size})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await lifespan(receive, send)
            return
        if kind != "http":
            return  # websockets are not served; returning closes them
        route = _route(scope)
        method = scope["method"]
        if route == "/rpc":
            if method != "POST":
                await _text(send, 405, "use POST", [(b"allow", b"POST")])
            else:
                await self._rpc(scope, receive, send)
        elif route.startswith("/blobs/"):
            if method not in ("GET", "HEAD"):
                await _text(send, 405, "use GET or HEAD", [(b"allow", b"GET, HEAD")])
            else:
                await self._blob(scope, receive, send, route[len("/blobs/") :])
        else:
            await _text(send, 404, "no such route")

    # -- frames ---------------------------------------------------------------------------

    async def _rpc(self, scope: Scope, receive: Receive, send: Send) -> None:
        cap = self.max_frame_size
        declared = _content_length(scope)
        if declared is not None and declared > cap:
            await _text(send, 413, f"frame too large ({declared} > {cap} bytes)")
            return
        parts: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > cap:
                await _text(send, 413, f"frame too large (over {cap} bytes)")
                return
            if chunk:
                parts.append(chunk)
            if not message.get("more_body", False):
                break
        frame = b"".join(parts)
        try:
            reply = await self.handler(frame)
            if not isinstance(reply, bytes | bytearray | memoryview):
                raise TypeError(f"the request handler returned {type(reply).__name__}, not bytes")
        except Exception:
            logger.exception(
                "The request handler failed on a %d-byte frame from %s", len(frame), _client(scope)
            )
            await _text(send, 500, "the peer failed to handle the request")
            return
        body = bytes(reply)
        headers = [_OCTETS, (b"content-length", b"%d" % len(body))]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        except OSError as exc:  # ASGI 2.4: the client went away (it may have timed out)
            logger.debug("Could not send a reply to %s: %r", _client(scope), exc)

    # -- blobs ----------------------------------------------------------------------------

    async def _blob(self, scope: Scope, receive: Receive, send: Send, name: str) -> None:
        try:
            digest = Digest.parse(name)
        except DigestError:
            await _text(send, 400, "malformed digest")
            return
        ranged, last = _range(scope)
        offset = ranged or 0
        try:
            blob = await self.blobs(digest, offset)
        except Exception:
            logger.exception("The blob source failed on %s (offset %d)", digest, offset)
            await _text(send, 500, "the peer failed to open the blob")
            return
        if blob is None:
            await _text(send, 404, "blob not found")
            return
        try:
            await self._send_blob(
                scope, receive, send, digest, blob, offset, ranged is not None, last
            )
        finally:
            await _aclose_body(blob.body)

    async def _send_blob(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        digest: Digest,
        blob: PeerBlob,
        offset: int,
        ranged: bool,
        last: int | None = None,
    ) -> None:
        size = blob.size
        problem = served_blob_problem(blob, offset)
        if problem is not None:
            logger.error("Serving %s: %s", digest, problem)
            await _text(send, 500, "the peer failed to open the blob")
            return
        headers = [_OCTETS, (b"accept-ranges", b"bytes")]
        count: int | None = None
        if size is not None:
            if ranged and offset >= size:
                headers = [(b"content-range", b"bytes */%d" % size)]
                await _text(send, 416, "range not satisfiable", headers)
                return
            if last is not None and last < offset:
                headers = [(b"content-range", b"bytes */%d" % size)]
                await _text(send, 416, "range not satisfiable", headers)
                return
            end = size - 1 if last is None else min(last, size - 1)
            count = end - offset + 1
            headers.append((b"content-length", b"%d" % count))
            if ranged:
                headers.append((b"content-range", b"bytes %d-%d/%d" % (offset, end, size)))
        status = 206 if ranged else 200
        start = {"type": "http.response.start", "status": status, "headers": headers}
        if scope["method"] == "HEAD" or count == 0:
            try:
                await send(start)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError as exc:
                logger.debug("Could not answer %s: %r", _client(scope), exc)
            return
        extensions = scope.get("extensions") or {}
        if blob.path is not None and count is not None and SENDFILE in extensions:
            message = {"type": SENDFILE, "path": blob.path, "offset": offset, "count": count}
            try:
                await send(start)
                await send(message)
            except OSError as exc:  # client gone, or the file vanished (nothing was sent then)
                logger.debug("Zero-copy send of %s to %s failed: %r", digest, _client(scope), exc)
                raise
            return
        limited = size is not None and last is not None and last < size - 1
        await self._stream(scope, receive, send, digest, blob.body, start, count, limited)

    async def _stream(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        digest: Digest,
        body: AsyncIterator[bytes],
        start: Message,
        count: int | None,
        limited: bool = False,
    ) -> None:
        # Pull the first chunk before answering: a source that fails at once is a clean 500.
        try:
            first = await _next_chunk(body)
        except Exception:
            logger.exception("The blob body of %s failed before its first byte", digest)
            await _text(send, 500, "the peer failed to read the blob")
            return
        failure: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            try:
                await _copy(send, body, start, first, count, limited)
            except OSError as exc:  # the client went away
                logger.debug("Sending %s to %s stopped: %r", digest, _client(scope), exc)
            except Exception as exc:
                failure = exc
            finally:
                tg.cancel_scope.cancel()
        if failure is not None:
            # Headers (and maybe bytes) are out: only cutting the connection tells the peer.
            raise BlobSourceError(f"serving {digest} failed: {failure}") from failure


async def _copy(
    send: Send,
    body: AsyncIterator[bytes],
    start: Message,
    first: bytes | None,
    count: int | None,
    limited: bool = False,
) -> None:
    """Send ``count`` bytes of ``body``; with ``limited`` (a range that ends before the
    blob does), the body's bytes past ``count`` are not read."""
    await send(start)
    sent = 0
    chunk = first
    while chunk is not None:
        if chunk:
            if count is not None and sent + len(chunk) > count:
                if not limited:
                    raise BlobSourceError(f"the blob body is longer than its size ({count} bytes)")
                chunk = chunk[: count - sent]
            await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            sent += len(chunk)
            if limited and sent == count:
                break
        try:
            chunk = await _next_chunk(body)
        except Exception as exc:  # not OSError from send(): that means the client left
            raise BlobSourceError(f"the blob body failed after {sent} bytes: {exc!r}") from exc
    if count is not None and sent != count:
        raise BlobSourceError(f"the blob body ended after {sent} of {count} bytes")
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _next_chunk(body: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await body.__anext__()
    except StopAsyncIteration:
        return None


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _aclose_body(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await aclose()
        except Exception:
            logger.exception("Closing a blob body failed")


# -- helpers ------------------------------------------------------------------------------


def _route(scope: Scope) -> str:
    """The path below the mount point: ``/rpc``, ``/blobs/...``."""
    path: str = scope.get("path") or "/"
    root: str = (scope.get("root_path") or "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :] or "/"  # ASGI: ``path`` includes ``root_path``
    if not root.endswith(PREFIX) and (path == PREFIX or path.startswith(PREFIX + "/")):
        path = path[len(PREFIX) :] or "/"  # called with the full path, not mounted
    return path


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if bytes(key).lower() == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _range(scope: Scope) -> tuple[int | None, int | None]:
    """``(N, M)`` of a ``Range: bytes=N-M`` header (``M`` may be absent: ``None``);
    ``(None, None)`` for no header or another form."""
    value = _header(scope, b"range")
    if value is None:
        return None, None
    match = _RANGE.fullmatch(value.decode("latin-1"))
    if match is None:
        return None, None
    return int(match.group(1)), None if match.group(2) is None else int(match.group(2))


def _client(scope: Scope) -> str:
    client = scope.get("client")
    if client:
        return f"{client[0]}:{client[1]}"
    return "a peer"


async def _text(
    send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = text.encode("utf-8") + b"\n"
    all_headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        *(headers or ()),
    ]
    try:
        await send({"type": "http.response.start", "status": status, "headers": all_headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except OSError as exc:
        logger.debug("Could not send a %d answer: %r", status, exc)
