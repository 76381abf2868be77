"""A plain-HTTP/1.1 transport for httpx that reads response bodies into 1 MiB buffers.

httpx's default stack (httpcore and h11 over anyio streams) receives 64 KiB at a time
and copies every piece several times on its way up: on loopback, receiving a 1 GiB blob
costs about 1.4 s of CPU, some six times a socket read into a buffer. Blobs are most of
what a node receives (from the upstream registry during a build, from peers otherwise),
so this transport keeps httpx's API (requests, responses, timeouts, exceptions) and h11's
parsing of the status line, the headers and chunked bodies, and reads a body of known
length straight from the socket with ``recv_into``.

Mount it for ``http://`` only (``httpx.AsyncClient(mounts={"http://": ...})``): ``https://``
stays on httpx's own transport, where TLS costs more than the copies anyway.

* Keep-alive: a connection whose response was read to its end goes back to a small idle
  pool (per host and port) and is checked before reuse; a GET that fails on a reused
  connection before any byte of the answer is tried once more on a new one.
* Timeouts: httpx's ``connect``, ``read`` (between two arrivals) and ``write``.
* A body yields a chunk when its buffer is full, at the end, or when a slower sender has
  left bytes waiting for :data:`LINGER` seconds (a slow transfer is seen as it goes).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Final

import anyio
import h11
import httpx

__all__ = ["LINGER", "PlainHttpTransport"]

CHUNK: Final = 1024 * 1024
#: Longest a received byte waits in a part-filled buffer before it is handed on.
LINGER: Final = 0.1
_HEAD_READ: Final = 64 * 1024
_Timeouts = dict[str, float | None]
_Key = tuple[str, int]


class PlainHttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport for ``http://`` URLs (see the module's docs)."""

    def __init__(self, *, chunk_size: int = CHUNK, max_connections: int | None = None,
                 max_idle_per_host: int = 16, keepalive_expiry: float = 30.0) -> None:
        if (chunk_size < 1 or max_idle_per_host < 0 or keepalive_expiry < 0
                or (max_connections is not None and max_connections < 1)):
            raise ValueError("chunk_size and max_connections must be >= 1, the others >= 0")
        self.chunk_size = chunk_size
        #: At most this many exchanges at once (a request waits for one to end, up to
        #: httpx's ``pool`` timeout); None: no limit.
        self.max_connections = max_connections
        self.max_idle_per_host = max_idle_per_host
        self.keepalive_expiry = keepalive_expiry
        self._idle: dict[_Key, list[tuple[socket.socket, float]]] = {}
        self._slots: anyio.Semaphore | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"this transport speaks plain http only, not {url.scheme}://", request=request)
        key = (url.host, url.port or 80)
        timeouts: _Timeouts = request.extensions.get("timeout", {})
        content = await request.aread()
        slot = await self._slot(timeouts.get("pool"), request)
        try:
            return await self._request(key, request, content, timeouts, slot)
        except BaseException:
            if slot is not None:
                slot.release()
            raise

    async def _slot(self, seconds: float | None,
                    request: httpx.Request) -> anyio.Semaphore | None:
        if self.max_connections is None:
            return None
        if self._slots is None:
            self._slots = anyio.Semaphore(self.max_connections)
        try:
            with anyio.fail_after(seconds):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection within the pool timeout",
                                    request=request) from None
        return self._slots

    async def _request(self, key: _Key, request: httpx.Request, content: bytes,
                       timeouts: _Timeouts, slot: anyio.Semaphore | None) -> httpx.Response:
        retry = request.method in ("GET", "HEAD")
        while True:
            sock = self._take(key)
            reused = sock is not None
            if sock is None:
                sock = await _connect(key, timeouts.get("connect"), request)
            try:
                return await self._exchange(sock, key, request, content, timeouts, slot)
            except _StaleConnection:
                sock.close()
                if not (reused and retry):
                    raise httpx.RemoteProtocolError(
                        "Server disconnected without sending a response.",
                        request=request) from None
                retry = False
            except BaseException:
                sock.close()
                raise

    async def _exchange(self, sock: socket.socket, key: _Key, request: httpx.Request,
                        content: bytes, timeouts: _Timeouts,
                        slot: anyio.Semaphore | None) -> httpx.Response:
        conn = h11.Connection(h11.CLIENT)
        try:
            data = conn.send(h11.Request(method=request.method, target=request.url.raw_path,
                                         headers=list(request.headers.raw)))
            if content:
                data += conn.send(h11.Data(data=content))
            data += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from None
        await _send_all(sock, data, timeouts.get("write"), request)
        event = await _response_head(sock, conn, timeouts.get("read"), request)
        headers = list(event.headers)
        status = event.status_code
        if request.method == "HEAD" or status in (204, 304):
            length: int | None = 0
        elif any(name == b"transfer-encoding" for name, _ in headers):
            length = None  # chunked: h11 decodes it
        else:
            lengths = {value.strip() for name, value in headers if name == b"content-length"}
            length = int(lengths.pop()) if lengths else None  # h11 checked them
        reusable = (event.http_version == b"1.1" and length is not None
                    and not _says_close(headers) and not _says_close(request.headers.raw))
        body = _Body(self, sock, key, conn, request, length=length, reusable=reusable,
                     read_timeout=timeouts.get("read"), slot=slot)
        return httpx.Response(status, headers=headers, stream=body,
                              extensions={"http_version": b"HTTP/" + event.http_version,
                                          "reason_phrase": event.reason})

    def _take(self, key: _Key) -> socket.socket | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            sock, since = idle.pop()
            if now - since <= self.keepalive_expiry and _still_open(sock):
                return sock
            sock.close()
        return None

    def _give_back(self, key: _Key, sock: socket.socket) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= self.max_idle_per_host:
            sock.close()
            return
        idle.append((sock, time.monotonic()))

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock, _ in socks:
                sock.close()


class _StaleConnection(Exception):
    """A reused connection closed before any byte of the answer."""


class _Body(httpx.AsyncByteStream):
    """A response body: raw reads of a known length, h11's events otherwise."""

    def __init__(self, transport: PlainHttpTransport, sock: socket.socket, key: _Key,
                 conn: h11.Connection, request: httpx.Request, *, length: int | None,
                 reusable: bool, read_timeout: float | None,
                 slot: anyio.Semaphore | None) -> None:
        self._transport = transport
        self._slot = slot
        self._sock: socket.socket | None = sock
        self._key = key
        self._conn = conn
        self._request = request
        self._length = length
        self._reusable = reusable
        self._timeout = read_timeout
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._sock is None:
            raise httpx.StreamClosed()
        try:
            if self._length is None:
                async for data in self._events():
                    yield data
            else:
                async for data in self._raw(self._length):
                    yield data
            self._done = True
        finally:
            await self.aclose()

    async def _raw(self, length: int) -> AsyncIterator[bytes]:
        sock = self._sock
        assert sock is not None
        leftover, _ = self._conn.trailing_data
        if len(leftover) > length:  # more than announced: never reuse this connection
            self._reusable = False
            leftover = leftover[:length]
        remaining = length - len(leftover)
        if leftover:
            # The body's last bytes received: the connection can be kept even when the
            # reader stops here, without asking for the end of the stream.
            self._done = not remaining
            yield leftover
        # One buffer, refilled: each chunk leaves as a copy of its filled part (a fresh
        # 1 MiB buffer per chunk would cost its page faults every time).
        buf = memoryview(bytearray(min(self._transport.chunk_size, remaining)))
        while remaining:
            view = buf[:min(len(buf), remaining)]
            got = 0
            first = 0.0
            while got < len(view):
                try:
                    n = sock.recv_into(view[got:])
                except BlockingIOError:
                    wait = self._timeout
                    if got:
                        linger = first + LINGER - time.monotonic()
                        if linger <= 0:
                            break
                        wait = linger if wait is None else min(wait, linger)
                    with anyio.move_on_after(wait) as scope:
                        await anyio.wait_readable(sock)
                    if scope.cancelled_caught and not got:
                        raise httpx.ReadTimeout("timed out waiting for the response body",
                                                request=self._request) from None
                    continue
                except OSError as exc:
                    raise httpx.ReadError(str(exc) or type(exc).__name__,
                                          request=self._request) from None
                if n == 0:
                    received = length - remaining + got
                    raise httpx.RemoteProtocolError(
                        "peer closed connection without sending complete message body: "
                        f"received {received} bytes, expected {length}",
                        request=self._request)
                if not got:
                    first = time.monotonic()
                got += n
            remaining -= got
            self._done = not remaining
            yield bytes(view[:got])

    async def _events(self) -> AsyncIterator[bytes]:
        sock = self._sock
        assert sock is not None
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=self._request) from None
            if event is h11.NEED_DATA:
                conn.receive_data(await _receive(sock, self._timeout, self._request))
            elif isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def aclose(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
        if self._done and self._reusable:
            self._transport._give_back(self._key, sock)
        else:
            sock.close()


async def _connect(key: _Key, seconds: float | None, request: httpx.Request) -> socket.socket:
    host, port = key
    last: OSError | None = None
    try:
        with anyio.fail_after(seconds):
            try:
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise httpx.ConnectError(str(exc), request=request) from None
            for family, kind, proto, _, address in infos:
                sock = socket.socket(family, kind, proto)
                try:
                    sock.setblocking(False)
                    try:
                        sock.connect(address)
                    except BlockingIOError:
                        await anyio.wait_writable(sock)
                        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if error:
                            raise OSError(error, os.strerror(error)) from None
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return sock
                except OSError as exc:
                    sock.close()
                    last = exc
                except BaseException:
                    sock.close()
                    raise
    except TimeoutError:
        raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out",
                                   request=request) from None
    raise httpx.ConnectError(str(last) if last else f"no address for {host}", request=request)


async def _send_all(sock: socket.socket, data: bytes, seconds: float | None,
                    request: httpx.Request) -> None:
    view = memoryview(data)
    try:
        with anyio.fail_after(seconds):
            while view:
                try:
                    view = view[sock.send(view):]
                except BlockingIOError:
                    await anyio.wait_writable(sock)
    except TimeoutError:
        raise httpx.WriteTimeout("timed out sending the request", request=request) from None
    except (BrokenPipeError, ConnectionResetError):
        raise _StaleConnection() from None
    except OSError as exc:
        raise httpx.WriteError(str(exc) or type(exc).__name__, request=request) from None


async def _receive(sock: socket.socket, seconds: float | None, request: httpx.Request) -> bytes:
    """Some bytes (``b""`` at the end of the stream)."""
    try:
        with anyio.fail_after(seconds):
            while True:
                try:
                    return sock.recv(_HEAD_READ)
                except BlockingIOError:
                    await anyio.wait_readable(sock)
    except TimeoutError:
        raise httpx.ReadTimeout("timed out waiting for the response", request=request) from None
    except OSError as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from None


async def _response_head(sock: socket.socket, conn: h11.Connection, seconds: float | None,
                         request: httpx.Request) -> h11.Response:
    received = False
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from None
        if isinstance(event, h11.Response):
            return event
        if event is h11.NEED_DATA:
            try:
                data = await _receive(sock, seconds, request)
            except httpx.ReadError:
                if received:
                    raise
                raise _StaleConnection() from None
            if not data and not received:
                raise _StaleConnection()
            received = True
            conn.receive_data(data)
        elif isinstance(event, h11.ConnectionClosed):
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.",
                                            request=request)
        # an InformationalResponse (1xx): the final answer follows


def _says_close(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"connection" and b"close" in value.lower()
               for name, value in headers)


def _still_open(sock: socket.socket) -> bool:
    """An idle connection is usable when the peer neither closed it nor sent anything."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # closed (b"") or unexpected bytes
