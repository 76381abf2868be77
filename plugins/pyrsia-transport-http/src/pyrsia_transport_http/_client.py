"""The transport and its client side: one pooled ``httpx.AsyncClient`` per transport.

Every failure of the remote side (nobody listening, a reset, a timeout, an unexpected
status, a reply over the frame cap, a body shorter or longer than announced) reaches the
caller as :class:`~pyrsia_core.errors.TransportError` naming the peer; httpx exceptions
never escape (STYLE P8). Misuse (a closed client, a bad argument) is a
:class:`~pyrsia_core.errors.UsageError`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import AsyncIterator, Mapping
from typing import ClassVar, Final

import anyio
import httpx
from pyrsia_core.errors import TransportError, UsageError
from pyrsia_core.interfaces import (
    BlobSource,
    OpeningPeerClient,
    PeerAddress,
    PeerBlob,
    PeerTransport,
    RequestHandler,
    check_timeout,
)

from pyrsia_core import Digest

from ._app import PeerApp
from ._limits import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_FRAME_SIZE, MIN_CHUNK_SIZE, PREFIX
from ._plain import PlainHttpTransport

__all__ = ["HttpPeerClient", "HttpTransport"]

_VERSION: Final = "0.1.0"

#: What the HTTP stack may raise on a failed exchange; all become TransportError.
_HTTP_ERRORS: Final = (
    httpx.HTTPError,
    httpx.InvalidURL,
    httpx.StreamError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)
_CONTENT_RANGE: Final = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})", re.ASCII)
_UNSATISFIED_RANGE: Final = re.compile(r"bytes \*/(\d{1,19})", re.ASCII)
_DETAIL_BYTES: Final = 200


class HttpTransport(PeerTransport):
    """Peers talk HTTP/1.1 on each node's own HTTP port, under ``/p2p``.

    * ``timeout``: seconds to establish a connection (each call's own ``timeout`` bounds
      the whole exchange, or each chunk of a blob body).
    * ``max_connections``: size of the shared connection pool (all peers together).
    * ``chunk_size``: size of the chunks blob bodies yield (256 KiB to 1 MiB).
    * ``max_frame_size``: largest reply frame accepted, and largest request frame the
      app from :meth:`asgi_app` accepts.
    """

    name: ClassVar[str] = "http"

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        max_connections: int = 100,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> None:
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise UsageError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(max_connections, int) and max_connections >= 1):
            raise UsageError(f"max_connections must be >= 1, got {max_connections!r}")
        if not (isinstance(chunk_size, int) and MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE):
            raise UsageError(
                f"chunk_size must be {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes, got {chunk_size!r}"
            )
        if not (isinstance(max_frame_size, int) and max_frame_size >= 0):
            raise UsageError(f"max_frame_size must be >= 0, got {max_frame_size!r}")
        self.timeout = float(timeout)
        self.max_connections = max_connections
        self.chunk_size = chunk_size
        self.max_frame_size = max_frame_size
        self._http: httpx.AsyncClient | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> HttpTransport:
        """Entry-point factory; keys (all optional): ``timeout``, ``max_connections``."""
        unknown = sorted(set(config) - {"timeout", "max_connections"})
        if unknown:
            raise UsageError(
                f"unknown http transport option(s) {', '.join(map(repr, unknown))}: "
                "the options are 'timeout' and 'max_connections'"
            )
        timeout = 10.0
        max_connections = 100
        if config.get("timeout", "").strip():
            try:
                timeout = float(config["timeout"])
            except ValueError:
                raise UsageError(
                    f"timeout must be a number of seconds, got {config['timeout']!r}"
                ) from None
        if config.get("max_connections", "").strip():
            try:
                max_connections = int(config["max_connections"])
            except ValueError:
                raise UsageError(
                    f"max_connections must be an integer, got {config['max_connections']!r}"
                ) from None
        return cls(timeout=timeout, max_connections=max_connections)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(timeout={self.timeout!r}, "
            f"max_connections={self.max_connections!r})"
        )

    # -- client side ----------------------------------------------------------------------

    async def connect(self, address: PeerAddress) -> HttpPeerClient:
        """A client for the peer at ``address.url`` (``http://host:port``); connects lazily."""
        self._check_open()
        if not isinstance(address, PeerAddress):
            raise UsageError(f"connect() takes a PeerAddress, got {type(address).__name__}")
        return HttpPeerClient(self, address, _base_url(address))

    def _client(self) -> httpx.AsyncClient:
        self._check_open()
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.timeout,
                limits=httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_connections,
                    keepalive_expiry=30.0,
                ),
                headers={
                    "user-agent": f"pyrsia-transport-http/{_VERSION}",
                    "accept-encoding": "identity",
                },
                follow_redirects=False,
                trust_env=False,  # peers are reached directly, never through an env proxy
                # Blob bodies straight into 1 MiB buffers (https:// peers: httpx's own).
                mounts={"http://": PlainHttpTransport(
                    chunk_size=self.chunk_size, max_connections=self.max_connections,
                    max_idle_per_host=self.max_connections)},
            )
        return self._http

    def _timeouts(self, timeout: float) -> httpx.Timeout:
        return httpx.Timeout(timeout, connect=min(timeout, self.timeout))

    # -- server side ----------------------------------------------------------------------

    def asgi_app(self, handler: RequestHandler, blobs: BlobSource) -> PeerApp:
        """The ASGI app the node mounts at ``/p2p`` (see :class:`PeerApp`)."""
        return PeerApp(handler, blobs, max_frame_size=self.max_frame_size)

    # -- lifecycle ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection pool; idempotent. Open clients fail from now on."""
        if self._closed:
            return
        await super().aclose()
        http, self._http = self._http, None
        if http is not None:
            with anyio.CancelScope(shield=True):
                await http.aclose()


class HttpPeerClient(OpeningPeerClient):
    """Talks to one peer through its transport's shared connection pool.

    Closing it only marks it closed: the pool (and its keep-alive connections) belongs
    to the transport.
    """

    def __init__(self, transport: HttpTransport, address: PeerAddress, base_url: str) -> None:
        self.transport = transport
        self.address = address
        self._base = base_url
        self._where = _describe(address)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where})"

    def _http(self) -> httpx.AsyncClient:
        self._check_open()
        return self.transport._client()

    async def request(self, frame: bytes, *, timeout: float) -> bytes:  # noqa: ASYNC109 (ABC's signature)
        """``POST /p2p/rpc``: send ``frame``, return the reply frame (``200`` only)."""
        http = self._http()
        check_timeout(timeout)
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise UsageError(f"a frame is bytes, got {type(frame).__name__}")
        cap = self.transport.max_frame_size
        where = self._where
        if len(frame) > cap:  # as the peer would answer 413; sending it would only waste time
            raise TransportError(
                f"a {len(frame)}-byte frame exceeds the {cap}-byte limit; not sent to peer {where}"
            )
        try:
            with anyio.fail_after(timeout):
                request = http.build_request(
                    "POST",
                    f"{self._base}{PREFIX}/rpc",
                    content=bytes(frame),
                    headers={"content-type": "application/octet-stream"},
                    timeout=self.transport._timeouts(timeout),
                )
                response = await http.send(request, stream=True)
                try:
                    status = response.status_code
                    if status != 200:
                        detail = await _detail(response)
                        if status == 413:
                            raise TransportError(
                                f"peer {where} refused a {len(frame)}-byte frame as too large "
                                f"(HTTP 413{detail})"
                            )
                        if status == 500:
                            raise TransportError(
                                f"peer {where} failed to handle the request (HTTP 500{detail})"
                            )
                        raise TransportError(f"peer {where} answered HTTP {status}{detail}")
                    return await _read_capped(response, cap, where)
                finally:
                    await _aclose_response(response)
        except TimeoutError:
            raise TransportError(f"peer {where} did not reply within {timeout:g} s") from None
        except _HTTP_ERRORS as exc:
            raise _mapped(exc, where) from exc

    async def _open_blob(
        self, digest: Digest, offset: int, timeout: float, length: int | None  # noqa: ASYNC109
    ) -> PeerBlob:
        """``GET /p2p/blobs/<digest>``; with ``length``, only bytes ``offset ..
        offset+length-1`` are asked for (``Range: bytes=N-M``). Until the caller drains or
        closes the body, it holds a pooled connection."""
        body = await self._open(digest, offset, timeout, length)
        return PeerBlob(size=body.size, offset=offset, body=body)

    async def _open(
        self, digest: Digest, offset: int, seconds: float, length: int | None = None
    ) -> BlobBody:
        http = self._http()
        where = self._where
        if length is not None:
            headers = {"range": f"bytes={offset}-{offset + length - 1}"}
        else:
            headers = {"range": f"bytes={offset}-"} if offset else {}
        response: httpx.Response | None = None
        try:
            try:
                with anyio.fail_after(seconds):
                    request = http.build_request(
                        "GET",
                        f"{self._base}{PREFIX}/blobs/{digest}",
                        headers=headers,
                        timeout=self.transport._timeouts(seconds),
                    )
                    response = await http.send(request, stream=True)
                    size, remaining = await _blob_extent(
                        response, digest, offset, where, length
                    )
            except TimeoutError:
                raise TransportError(
                    f"peer {where} did not answer for {digest} within {seconds:g} s"
                ) from None
            except _HTTP_ERRORS as exc:
                raise _mapped(exc, where) from exc
        except BaseException:
            if response is not None:
                await _aclose_response(response)
            raise
        return BlobBody(
            response,
            size=size,
            remaining=remaining,
            timeout=seconds,
            chunk_size=self.transport.chunk_size,
            where=where,
        )


class BlobBody:
    """The body of a blob response: an async iterator of 256 KiB-1 MiB chunks.

    Each chunk must arrive within ``timeout`` seconds, else :class:`TransportError` (a
    stalled peer). Never yields more than the announced bytes, and a body that ends short
    raises instead of ending quietly. The response is closed at the end, on any error, and
    by :meth:`aclose` (a consumer that stops early must call it).
    """

    def __init__(
        self,
        response: httpx.Response,
        *,
        size: int | None,
        remaining: int | None,
        timeout: float,
        chunk_size: int,
        where: str,
    ) -> None:
        self.size = size
        self._response = response
        self._remaining = remaining
        self._timeout = timeout
        self._where = where
        self._chunk_size = chunk_size
        self._pending = bytearray()
        self._chunks: AsyncIterator[bytes] | None = (
            None if remaining == 0 else response.aiter_raw()
        )
        self._done = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} from {self._where}, {self._remaining} bytes to go>"

    def __aiter__(self) -> BlobBody:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            return await self._next()
        except BaseException:
            await self.aclose()
            raise

    async def _next(self) -> bytes:
        """The next ``chunk_size`` bytes (the last chunk may be shorter): a chunk as the
        connection delivered it when it has that size, else pieces gathered or cut."""
        size = self._chunk_size
        pending = self._pending
        while len(pending) < size:
            try:
                piece = await self._piece()
            except StopAsyncIteration:
                if not pending:
                    raise
                break
            if not pending and len(piece) == size:
                return piece
            pending += piece
        chunk = bytes(pending[:size])
        del pending[:size]
        return chunk

    async def _piece(self) -> bytes:
        where = self._where
        while True:
            if self._chunks is None:
                raise StopAsyncIteration
            try:
                with anyio.fail_after(self._timeout):
                    chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                if self._remaining:
                    raise TransportError(
                        f"peer {where} ended the blob {self._remaining} bytes short"
                    ) from None
                raise
            except TimeoutError:
                raise TransportError(
                    f"peer {where} stalled: no data for {self._timeout:g} s"
                ) from None
            except _HTTP_ERRORS as exc:
                raise _mapped(exc, where) from exc
            if not chunk:
                continue
            if self._remaining is not None:
                if len(chunk) > self._remaining:
                    raise TransportError(f"peer {where} sent more bytes than the blob's size")
                self._remaining -= len(chunk)
            return chunk

    async def aclose(self) -> None:
        """Stop reading and release the connection; idempotent."""
        if self._done:
            return
        self._done = True
        chunks, self._chunks = self._chunks, None
        with anyio.CancelScope(shield=True):
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        await _aclose_response(self._response)


# -- helpers ------------------------------------------------------------------------------


def _base_url(address: PeerAddress) -> str:
    url = address.url
    if not isinstance(url, str):
        raise UsageError(f"a peer address URL is a string, got {type(url).__name__}")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UsageError(f"malformed peer address {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UsageError(f"a peer address is http(s)://host:port, got {url!r}")
    if parsed.query or parsed.fragment:
        raise UsageError(f"a peer address has no query or fragment, got {url!r}")
    return url.rstrip("/")


def _describe(address: PeerAddress) -> str:
    if address.node_id:
        return f"{address.url} (node {address.node_id[:16]})"
    return address.url


def _mapped(exc: BaseException, where: str) -> TransportError:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return TransportError(f"could not connect to peer {where}: timed out")
    if isinstance(exc, httpx.ConnectError):
        return TransportError(f"could not connect to peer {where}: {detail}")
    if isinstance(exc, httpx.TimeoutException):
        return TransportError(f"peer {where} timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.RemoteProtocolError):
        return TransportError(f"peer {where} broke off the exchange: {detail}")
    return TransportError(f"exchange with peer {where} failed: {type(exc).__name__}: {detail}")


async def _aclose_response(response: httpx.Response) -> None:
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(*_HTTP_ERRORS):
            await response.aclose()


async def _detail(response: httpx.Response) -> str:
    """A short excerpt of an error body, for the error message."""
    data = b""
    with contextlib.suppress(*_HTTP_ERRORS):
        async for chunk in response.aiter_raw():
            data += chunk
            if len(data) >= _DETAIL_BYTES:
                break
    text = data[:_DETAIL_BYTES].decode("utf-8", "replace").strip()
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return f": {text}" if text else ""


async def _read_capped(response: httpx.Response, cap: int, where: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > cap:
        raise TransportError(f"peer {where} sent a {int(declared)}-byte reply (over {cap} bytes)")
    parts: list[bytes] = []
    total = 0
    async for chunk in response.aiter_raw():
        total += len(chunk)
        if total > cap:
            raise TransportError(f"peer {where} sent a reply over {cap} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def _blob_extent(
    response: httpx.Response, digest: Digest, offset: int, where: str,
    wanted: int | None = None,
) -> tuple[int | None, int | None]:
    """``(size, bytes to come)`` of a blob response, or raise for a response we can't use."""
    status = response.status_code
    length = _int_header(response, "content-length", where)
    if status == 200:
        if offset:
            raise TransportError(f"peer {where} ignored the Range request for {digest}")
        return length, length
    if status == 206:
        value = response.headers.get("content-range", "")
        match = _CONTENT_RANGE.fullmatch(value.strip())
        if match is None:
            raise TransportError(f"peer {where} sent a malformed Content-Range {value!r:.80}")
        first, last, size = (int(g) for g in match.groups())
        if first != offset:
            raise TransportError(
                f"peer {where} sent {digest} from byte {first}, not from {offset} as asked"
            )
        count = last - first + 1
        # The tail was asked for (no ``wanted``): it must run to the end of the blob.
        # A range was asked for: at most that many bytes, within the blob.
        if (
            last >= size or last < first
            or (count > wanted if wanted is not None else last != size - 1)
            or (length is not None and length != count)
        ):
            raise TransportError(f"peer {where} sent an inconsistent Content-Range {value!r:.80}")
        return size, count
    if status == 416:
        value = response.headers.get("content-range", "")
        match = _UNSATISFIED_RANGE.fullmatch(value.strip())
        if match is not None and int(match.group(1)) == offset:
            return offset, 0  # the tail from the very end: nothing
        of_size = f" of {match.group(1)} bytes" if match else ""
        raise TransportError(
            f"peer {where}: offset {offset} lies beyond the blob {digest}{of_size}"
        )
    detail = await _detail(response)
    if status == 404:
        raise TransportError(f"peer {where} does not have {digest}")
    raise TransportError(f"peer {where} answered HTTP {status} for {digest}{detail}")


def _int_header(response: httpx.Response, name: str, where: str) -> int | None:
    value = response.headers.get(name)
    if value is None:
        return None
    if not value.strip().isdigit() or len(value.strip()) > 19:
        raise TransportError(f"peer {where} sent a malformed {name} {value!r:.40}")
    return int(value)
