"""The transport, its clients, blob bodies, and the server endpoint.

Every failure of the remote side (nobody listening, a closed connection, a reset
stream, a timeout, an error reply, a reply over the frame cap, a body shorter or longer
than announced) reaches the caller as :class:`~pyrsia_core.errors.TransportError` naming
the peer; aioquic and socket exceptions never escape (STYLE P8). Misuse (a closed
client, a bad argument) is a :class:`~pyrsia_core.errors.UsageError`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit

import anyio
import anyio.abc
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from pyrsia_core.errors import DigestError, TransportError, UsageError
from pyrsia_core.interfaces import (
    BlobSource,
    OpeningPeerClient,
    PeerAddress,
    PeerBlob,
    PeerTransport,
    RequestHandler,
    check_timeout,
    served_blob_problem,
)

from pyrsia_core import Digest

from . import _protocol as P
from ._conn import FAILED, ClientConn, QuicConn, ServerConn, Stream
from ._tls import self_signed

__all__ = ["QuicBlobBody", "QuicPeerClient", "QuicTransport"]

logger = logging.getLogger("pyrsia.transport.quic")

KiB: Final = 1024
MiB: Final = 1024 * KiB
#: Largest request or reply frame either side accepts (as the HTTP transport).
MAX_FRAME_SIZE: Final = 16 * MiB
#: Largest chunk a blob body yields.
MAX_CHUNK_SIZE: Final = 1 * MiB
#: Bytes of a blob body the client lets the server send ahead of its consumer.
DEFAULT_WINDOW: Final = 8 * MiB
#: UDP payload size: safe on ordinary paths (1500-byte MTU with IPv6 and tunnel headers).
DEFAULT_DATAGRAM_SIZE: Final = 1350
#: QUIC's own flow-control windows: large, so that only the blob credit binds.
QUIC_MAX_DATA: Final = 64 * MiB
QUIC_MAX_STREAM_DATA: Final = 32 * MiB
#: Socket buffers (the kernel may clamp them).
SOCKET_BUFFER: Final = 4 * MiB
#: Most connections a server keeps (new ones are refused beyond).
MAX_CONNECTIONS: Final = 1024
_DETAIL_BYTES: Final = 300


class QuicTransport(PeerTransport):
    """Peers talk QUIC (TLS 1.3, one bidirectional stream per exchange) on a UDP port.

    * ``host``/``port``: where :meth:`serve` listens (``port=0``: a free port).
    * ``timeout``: seconds to establish a connection (each call's own ``timeout`` bounds
      the whole exchange, or each chunk of a blob body).
    * ``idle_timeout``: seconds without traffic after which a connection is closed.
    * ``window``: blob body bytes the server may send ahead of the consumer.
    * ``max_frame_size``: largest reply frame accepted, and largest request frame served.
    * ``max_datagram_size``: UDP payload size.

    Addresses are ``quic://host:port``. Clients of one transport share one QUIC
    connection per peer, opened lazily and reopened after it closes.
    """

    name: ClassVar[str] = "quic"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout: float = 10.0,
        idle_timeout: float = 30.0,
        window: int = DEFAULT_WINDOW,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_datagram_size: int = DEFAULT_DATAGRAM_SIZE,
        request_timeout: float = 30.0,
    ) -> None:
        for label, value in (
            ("timeout", timeout),
            ("idle_timeout", idle_timeout),
            ("request_timeout", request_timeout),
        ):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise UsageError(f"{label} must be a positive number of seconds, got {value!r}")
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise UsageError(f"port must be 0..65535, got {port!r}")
        if not (isinstance(window, int) and 64 * KiB <= window <= 256 * MiB):
            raise UsageError(f"window must be 64 KiB to 256 MiB, got {window!r}")
        if not (isinstance(max_frame_size, int) and max_frame_size >= 0):
            raise UsageError(f"max_frame_size must be >= 0, got {max_frame_size!r}")
        if not (isinstance(max_datagram_size, int) and 1200 <= max_datagram_size <= 65000):
            raise UsageError(f"max_datagram_size must be 1200..65000, got {max_datagram_size!r}")
        self.host = host
        self.port = port
        self.timeout = float(timeout)
        self.idle_timeout = float(idle_timeout)
        self.window = window
        self.max_frame_size = max_frame_size
        self.max_datagram_size = max_datagram_size
        self.request_timeout = float(request_timeout)
        self._conns: dict[tuple[str, int], ClientConn] = {}
        self._connecting: dict[tuple[str, int], anyio.Lock] = {}

    _OPTIONS: ClassVar[tuple[str, ...]] = (
        "host",
        "port",
        "timeout",
        "idle_timeout",
        "window",
        "max_datagram_size",
    )

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> QuicTransport:
        """Entry-point factory; keys (all optional): ``host``, ``port``, ``timeout``,
        ``idle_timeout``, ``window``, ``max_datagram_size``."""
        unknown = sorted(set(config) - set(cls._OPTIONS))
        if unknown:
            raise UsageError(
                f"unknown quic transport option(s) {', '.join(map(repr, unknown))}: "
                f"the options are {', '.join(map(repr, cls._OPTIONS))}"
            )
        kwargs: dict[str, Any] = {}
        for key, kind in (
            ("port", int),
            ("timeout", float),
            ("idle_timeout", float),
            ("window", int),
            ("max_datagram_size", int),
        ):
            text = config.get(key, "").strip()
            if text:
                try:
                    kwargs[key] = kind(text)
                except ValueError:
                    raise UsageError(f"quic option {key} must be a number, got {text!r}") from None
        if config.get("host", "").strip():
            kwargs["host"] = config["host"].strip()
        return cls(**kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(host={self.host!r}, port={self.port!r})"

    def _configuration(self, *, is_client: bool) -> QuicConfiguration:
        conf = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[P.ALPN],
            idle_timeout=self.idle_timeout,
            max_data=QUIC_MAX_DATA,
            max_stream_data=QUIC_MAX_STREAM_DATA,
            max_datagram_size=self.max_datagram_size,
        )
        if is_client:
            conf.verify_mode = ssl.CERT_NONE  # peers prove who they are by signed frames
        return conf

    # -- client side ----------------------------------------------------------------------

    async def connect(self, address: PeerAddress) -> QuicPeerClient:
        """A client for the peer at ``address.url`` (``quic://host:port``); connects lazily."""
        self._check_open()
        if not isinstance(address, PeerAddress):
            raise UsageError(f"connect() takes a PeerAddress, got {type(address).__name__}")
        host, port = parse_address(address.url)
        return QuicPeerClient(self, address, host, port)

    async def _connection(self, host: str, port: int, where: str, seconds: float) -> ClientConn:
        """The shared connection to ``host:port``, opened (or reopened) when needed."""
        self._check_open()
        key = (host, port)
        lock = self._connecting.setdefault(key, anyio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if conn is not None:
                conn.pump()  # learn about a close that arrived while nobody listened
                idle = anyio.current_time() - max(conn.last_sent, conn.last_received)
                if conn.closing or idle > self.idle_timeout / 2:
                    # The peer may have dropped it (it only hears us when we drive it).
                    self._conns.pop(key, None)
                    conn.aclose_now()
                    conn = None
            if conn is None:
                conn = await self._open(host, port, where, min(seconds, self.timeout))
                self._conns[key] = conn
            return conn

    async def _open(self, host: str, port: int, where: str, seconds: float) -> ClientConn:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise TransportError(f"could not resolve peer {where}: {exc}") from None
        if not infos:
            raise TransportError(f"could not resolve peer {where}")
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _grow_buffers(sock)
            sock.connect(sockaddr)
            quic = QuicConnection(configuration=self._configuration(is_client=True))
            conn = ClientConn(quic, where, sock)
            quic.connect(conn.peer, now=anyio.current_time())
            conn.transmit()
            try:
                with anyio.fail_after(seconds):
                    await conn.wait(lambda: conn.handshake_done)
            except TimeoutError:
                raise TransportError(
                    f"could not connect to peer {where}: no QUIC handshake within {seconds:g} s"
                ) from None
            if conn.terminated is not None:
                raise TransportError(f"could not connect to peer {where}: {conn.terminated}")
        except BaseException:
            if sock.fileno() >= 0:
                anyio.notify_closing(sock)
            sock.close()
            raise
        return conn

    # -- server side ----------------------------------------------------------------------

    async def serve(
        self,
        handler: RequestHandler,
        blobs: BlobSource,
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on UDP ``host:port`` until cancelled; reports the bound port."""
        self._check_open()
        endpoint = _Endpoint(self, handler, blobs)
        await endpoint.run(task_status)

    # -- lifecycle ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every client connection; idempotent. Open clients fail from now on."""
        if self._closed:
            return
        await super().aclose()
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.aclose_now()


class QuicPeerClient(OpeningPeerClient):
    """Talks to one peer over its transport's shared connection to that peer.

    Closing it only marks it closed: the connection belongs to the transport.
    """

    def __init__(self, transport: QuicTransport, address: PeerAddress, host: str, port: int):
        self.transport = transport
        self.address = address
        self._host = host
        self._port = port
        self._where = _describe(address)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where})"

    async def _conn(self, seconds: float) -> ClientConn:
        self._check_open()
        return await self.transport._connection(self._host, self._port, self._where, seconds)

    async def request(self, frame: bytes, *, timeout: float) -> bytes:  # noqa: ASYNC109 (ABC's signature)
        """Send ``frame`` on a new stream; return the reply frame."""
        self._check_open()
        check_timeout(timeout)
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise UsageError(f"a frame is bytes, got {type(frame).__name__}")
        cap = self.transport.max_frame_size
        where = self._where
        if len(frame) > cap:
            raise TransportError(
                f"a {len(frame)}-byte frame exceeds the {cap}-byte limit; not sent to peer {where}"
            )
        try:
            with anyio.fail_after(timeout):
                conn = await self._conn(timeout)
                return await self._exchange(conn, bytes(frame), cap)
        except TimeoutError:
            raise TransportError(f"peer {where} did not reply within {timeout:g} s") from None

    async def _exchange(self, conn: ClientConn, frame: bytes, cap: int) -> bytes:
        where = self._where
        stream = conn.open_stream()
        complete = False
        heard_at = conn.last_received
        try:
            conn.send(stream, P.RPC + frame, end=True)
            try:
                await conn.wait(lambda: stream.done or stream.buffered > cap + 1)
            except BaseException:
                if conn.last_received == heard_at:  # not a word from the peer: likely gone
                    self.transport._conns.pop((self._host, self._port), None)
                    conn.aclose_now()
                raise
            if stream.error is not None:
                raise TransportError(f"exchange with peer {where} failed: {stream.error}")
            if stream.buffered > cap + 1:
                raise TransportError(f"peer {where} sent a reply over {cap} bytes")
            complete = True
            data = stream.take(stream.buffered)
        finally:
            conn.forget(stream, complete=complete)
        if not data:
            raise TransportError(f"peer {where} closed the stream without a reply")
        status, body = data[0], data[1:]
        if status == P.OK:
            return body
        detail = _detail(body)
        if status == P.TOO_LARGE:
            raise TransportError(
                f"peer {where} refused a {len(frame) - 1}-byte frame as too large{detail}"
            )
        if status == P.ERROR:
            raise TransportError(f"peer {where} failed to handle the request{detail}")
        raise TransportError(f"peer {where} answered with unknown status {status}")

    async def _open_blob(
        self, digest: Digest, offset: int, timeout: float, length: int | None  # noqa: ASYNC109
    ) -> PeerBlob:
        """Ask on a new stream; with ``length`` the first credit the peer gets is at most
        ``length`` bytes, so it sends little past what is wanted."""
        if offset >= P.UNKNOWN_SIZE:
            raise UsageError(f"offset must be an integer >= 0, got {offset!r}")
        body = await self._open(digest, offset, timeout, length)
        return PeerBlob(size=body.size, offset=offset, body=body)

    async def _open(
        self, digest: Digest, offset: int, seconds: float, length: int | None = None
    ) -> QuicBlobBody:
        where = self._where
        window = self.transport.window
        if length is not None and length > 0:
            window = min(window, length)
        conn: ClientConn | None = None
        stream: Stream | None = None
        try:
            with anyio.fail_after(seconds):
                conn = await self._conn(seconds)
                stream = conn.open_stream()
                conn.send(stream, P.blob_request(str(digest), offset, window))
                await conn.wait(lambda: _head_ready(stream))
                return self._body(conn, stream, digest, offset, seconds, window)
        except TimeoutError:
            if conn is not None and stream is not None:
                conn.forget(stream, complete=False)
            raise TransportError(
                f"peer {where} did not answer for {digest} within {seconds:g} s"
            ) from None
        except BaseException:
            if conn is not None and stream is not None:
                conn.forget(stream, complete=False)
            raise

    def _body(
        self,
        conn: ClientConn,
        stream: Stream,
        digest: Digest,
        offset: int,
        seconds: float,
        window: int,
    ) -> QuicBlobBody:
        where = self._where
        if stream.buffered == 0:
            raise TransportError(
                f"fetching {digest} from peer {where} failed: {stream.error or 'no answer'}"
            )
        status = stream.take(1)[0]
        if status == P.OK:
            size = P.U64.unpack(stream.take_exactly(8))[0]
            known = None if size == P.UNKNOWN_SIZE else size
            if known is not None and known < offset:
                raise TransportError(f"peer {where} announced {known} bytes, below offset {offset}")
            remaining = None if known is None else known - offset
            return QuicBlobBody(
                conn,
                stream,
                size=known,
                remaining=remaining,
                timeout=seconds,
                window=window,
                where=where,
            )
        if status == P.NOT_FOUND:
            raise TransportError(f"peer {where} does not have {digest}")
        if status == P.RANGE:
            size_bytes = stream.take(8)
            of_size = f" of {P.U64.unpack(size_bytes)[0]} bytes" if len(size_bytes) == 8 else ""
            raise TransportError(
                f"peer {where}: offset {offset} lies beyond the blob {digest}{of_size}"
            )
        detail = _detail(stream.take(_DETAIL_BYTES))
        if status == P.ERROR:
            raise TransportError(f"peer {where} failed to send {digest}{detail}")
        raise TransportError(f"peer {where} answered {digest} with unknown status {status}")


def _head_ready(stream: Stream) -> bool:
    """Whether the blob reply's head (or all of a failure reply) is in."""
    if stream.finished or stream.ended:
        return True
    if stream.buffered < 1:
        return False
    first = stream.chunks[0][0]
    if first == P.OK:
        return stream.buffered >= 9
    return False  # an error reply: wait for all of it (it ends with FIN)


class QuicBlobBody:
    """The body of a blob reply: an async iterator of chunks of at most 1 MiB.

    Each chunk must arrive within ``timeout`` seconds, else :class:`TransportError` (a
    stalled peer). Never yields more than the announced bytes, and a body that ends short
    raises instead of ending quietly. The stream is released at the end, on any error,
    and by :meth:`aclose` (a consumer that stops early must call it).
    """

    def __init__(
        self,
        conn: ClientConn,
        stream: Stream,
        *,
        size: int | None,
        remaining: int | None,
        timeout: float,
        window: int,
        where: str,
    ) -> None:
        self.size = size
        self._conn = conn
        self._stream = stream
        self._remaining = remaining
        self._timeout = timeout
        self._window = window
        self._where = where
        self._granted = window
        self._consumed = 0
        self._done = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} from {self._where}, {self._remaining} bytes to go>"

    def __aiter__(self) -> QuicBlobBody:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._next()
        except StopAsyncIteration:
            self._finish(complete=True)
            raise
        except BaseException:
            self._finish(complete=False)
            raise
        return chunk

    async def _next(self) -> bytes:
        conn, stream, where = self._conn, self._stream, self._where
        try:
            with anyio.fail_after(self._timeout):
                await conn.wait(lambda: stream.buffered > 0 or stream.finished)
        except TimeoutError:
            raise TransportError(f"peer {where} stalled: no data for {self._timeout:g} s") from None
        if stream.buffered:
            chunk = stream.take(MAX_CHUNK_SIZE)
            self._consumed += len(chunk)
            if self._consumed > self._granted:
                raise TransportError(f"peer {where} sent more than the window it was given")
            if self._remaining is not None:
                if len(chunk) > self._remaining:
                    raise TransportError(f"peer {where} sent more bytes than the blob's size")
                self._remaining -= len(chunk)
            if self._granted - self._consumed <= self._window // 2 and not stream.ended:
                self._granted = self._consumed + self._window
                conn.send(stream, P.U64.pack(self._granted))
            return chunk
        if stream.error is not None:
            raise TransportError(f"fetching a blob from peer {where} failed: {stream.error}")
        if self._remaining:
            raise TransportError(f"peer {where} ended the blob {self._remaining} bytes short")
        raise StopAsyncIteration

    def _finish(self, *, complete: bool) -> None:
        if self._done:
            return
        self._done = True
        if complete:
            # Our side of the stream is still open (for credit): end it.
            with contextlib.suppress(Exception):
                self._conn.send(self._stream, b"", end=True)
        self._conn.forget(self._stream, complete=complete)

    async def aclose(self) -> None:
        """Stop reading and release the stream; idempotent."""
        self._finish(complete=self._stream.ended and not self._stream.chunks)


# -- the server ---------------------------------------------------------------------------


class BlobSourceError(RuntimeError):
    """The node's blob source broke its contract; the stream is reset."""


class _Endpoint:
    """The server's UDP socket: accepts connections, routes datagrams, serves streams."""

    def __init__(self, transport: QuicTransport, handler: RequestHandler, blobs: BlobSource):
        self.transport = transport
        self.handler = handler
        self.blobs = blobs
        self.conns: dict[bytes, ServerConn] = {}
        self.cert, self.key = self_signed()
        self._tg: anyio.abc.TaskGroup | None = None
        self._sock: socket.socket | None = None

    async def run(self, task_status: anyio.abc.TaskStatus[int]) -> None:
        host, port = self.transport.host, self.transport.port
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            raise TransportError(f"cannot listen on udp {host}:{port}: {exc}") from exc
        self._sock = sock
        try:
            sock.setblocking(False)
            _grow_buffers(sock)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise TransportError(f"cannot listen on udp {host}:{port}: {exc}") from exc
            bound = int(sock.getsockname()[1])
            logger.info("QUIC peer transport listening on udp %s:%d", host, bound)
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    task_status.started(bound)
                    await self._receive_loop(sock)
                finally:
                    for conn in set(self.conns.values()):
                        conn.close("the peer is shutting down")
                    tg.cancel_scope.cancel()
        finally:
            if sock.fileno() >= 0:
                anyio.notify_closing(sock)
            sock.close()

    async def _receive_loop(self, sock: socket.socket) -> None:
        while True:
            await anyio.wait_readable(sock)
            now = anyio.current_time()
            touched: dict[int, ServerConn] = {}
            for _ in range(256):
                try:
                    data, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                except OSError as exc:
                    logger.debug("QUIC receive error: %r", exc)
                    continue
                conn = self._route(data, addr)
                if conn is None:
                    continue
                try:
                    conn.receive(data, addr, now)
                except Exception:  # garbage the machine chokes on: drop that connection
                    logger.warning("QUIC connection from %s failed on a datagram", conn.where)
                    logger.debug("QUIC datagram failure", exc_info=True)
                    conn.close("internal error")
                    self._forget(conn)
                    continue
                touched[id(conn)] = conn
            for conn in touched.values():
                conn.process()
                conn.transmit()
                conn.kick()

    def _route(self, data: bytes, addr: Any) -> ServerConn | None:
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._cid_length
            )
        except ValueError:
            return None  # garbage: not even a QUIC header
        conn = self.conns.get(header.destination_cid)
        if conn is not None:
            return conn
        if (
            header.packet_type != QuicPacketType.INITIAL
            or len(data) < 1200
            or header.version not in self._versions
        ):
            return None
        if len(set(self.conns.values())) >= MAX_CONNECTIONS:
            logger.warning("Refusing a QUIC connection from %s: too many connections", addr)
            return None
        conf = self.transport._configuration(is_client=False)
        conf.certificate = self.cert
        conf.private_key = self.key
        quic = QuicConnection(
            configuration=conf, original_destination_connection_id=header.destination_cid
        )
        assert self._sock is not None
        new = ServerConn(quic, f"{addr[0]}:{addr[1]}", self._sock, self._stream, self._cid)
        self.conns[header.destination_cid] = new
        self.conns[quic.host_cid] = new
        assert self._tg is not None
        self._tg.start_soon(self._run_conn, new)
        return new

    _cid_length: ClassVar[int] = QuicConfiguration().connection_id_length
    _versions: ClassVar[list[int]] = QuicConfiguration().supported_versions

    def _cid(self, conn: ServerConn, cid: bytes, issued: bool) -> None:
        if issued:
            self.conns[cid] = conn
        elif self.conns.get(cid) is conn:
            del self.conns[cid]

    def _forget(self, conn: QuicConn) -> None:
        for cid in [cid for cid, c in self.conns.items() if c is conn]:
            del self.conns[cid]

    async def _run_conn(self, conn: ServerConn) -> None:
        try:
            await conn.run_timer()
        except Exception:
            logger.exception("QUIC connection from %s failed", conn.where)
            conn.close("internal error")
        finally:
            self._forget(conn)

    def _stream(self, conn: ServerConn, stream: Stream) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._serve_stream, conn, stream)

    async def _serve_stream(self, conn: ServerConn, stream: Stream) -> None:
        complete = False
        try:
            with anyio.fail_after(self.transport.request_timeout):
                await conn.wait(lambda: stream.buffered > 0 or stream.finished)
            kind = stream.take(1) if stream.buffered else b""
            if kind == P.RPC:
                complete = await self._rpc(conn, stream)
            elif kind == P.BLOB:
                complete = await self._blob(conn, stream)
            elif stream.error is None and conn.terminated is None:
                logger.debug("Peer %s opened a stream with kind %r", conn.where, kind[:1])
                self._answer(conn, stream, P.ERROR, b"unknown request kind")
                complete = True
        except TimeoutError:
            logger.debug("Peer %s sent no complete request in time", conn.where)
        except BlobSourceError as exc:
            logger.error("Serving a blob to %s failed: %s", conn.where, exc)
        except Exception:
            logger.exception("Serving a stream from %s failed", conn.where)
        finally:
            if not complete and not conn.closing:
                with contextlib.suppress(Exception):
                    conn.quic.reset_stream(stream.id, FAILED)
                    conn.quic.stop_stream(stream.id, FAILED)
                    conn.transmit()
            conn.streams.pop(stream.id, None)

    def _answer(self, conn: ServerConn, stream: Stream, status: int, body: bytes) -> None:
        conn.send(stream, bytes([status]) + body, end=True)

    async def _rpc(self, conn: ServerConn, stream: Stream) -> bool:
        cap = self.transport.max_frame_size
        with anyio.fail_after(self.transport.request_timeout):
            await conn.wait(lambda: stream.done or stream.buffered > cap)
        if stream.error is not None:
            return False
        if stream.buffered > cap:
            self._answer(conn, stream, P.TOO_LARGE, f"frame over {cap} bytes".encode())
            with contextlib.suppress(Exception):
                conn.quic.stop_stream(stream.id, FAILED)
            return True
        frame = stream.take(stream.buffered)
        try:
            reply = await self.handler(frame)
            if not isinstance(reply, bytes | bytearray | memoryview):
                raise TypeError(f"the request handler returned {type(reply).__name__}, not bytes")
        except Exception:
            logger.exception(
                "The request handler failed on a %d-byte frame from %s", len(frame), conn.where
            )
            self._answer(conn, stream, P.ERROR, b"the peer failed to handle the request")
            return True
        self._answer(conn, stream, P.OK, bytes(reply))
        return True

    async def _blob(self, conn: ServerConn, stream: Stream) -> bool:
        head = P.BLOB_HEADER.size - 1
        with anyio.fail_after(self.transport.request_timeout):
            await conn.wait(lambda: stream.done or stream.buffered >= head)
            if stream.buffered < head:
                return False
            offset, credit, length = P.BLOB_HEADER.unpack(P.BLOB + stream.take_exactly(head))[1:]
            await conn.wait(lambda: stream.done or stream.buffered >= length)
            if stream.buffered < length:
                return False
            name = stream.take_exactly(length)
        try:
            digest = Digest.parse(name.decode("ascii"))
        except (UnicodeDecodeError, DigestError):
            self._answer(conn, stream, P.ERROR, b"malformed digest")
            return True
        try:
            blob = await self.blobs(digest, offset)
        except Exception:
            logger.exception("The blob source failed on %s (offset %d)", digest, offset)
            self._answer(conn, stream, P.ERROR, b"the peer failed to open the blob")
            return True
        if blob is None:
            self._answer(conn, stream, P.NOT_FOUND, b"")
            return True
        try:
            return await self._send_blob(conn, stream, digest, blob, offset, credit)
        finally:
            await _aclose_body(blob.body)

    async def _send_blob(
        self,
        conn: ServerConn,
        stream: Stream,
        digest: Digest,
        blob: PeerBlob,
        offset: int,
        credit: int,
    ) -> bool:
        size = blob.size
        problem = served_blob_problem(blob, offset)
        if problem is not None:
            logger.error("Serving %s: %s", digest, problem)
            self._answer(conn, stream, P.ERROR, b"the peer failed to open the blob")
            return True
        if size is not None and offset > size:
            self._answer(conn, stream, P.RANGE, P.U64.pack(size))
            return True
        count = None if size is None else size - offset
        if count == 0:
            self._answer(conn, stream, P.OK, P.U64.pack(size or 0))
            return True
        conn.send(stream, bytes([P.OK]) + P.U64.pack(P.UNKNOWN_SIZE if size is None else size))
        granted = credit

        def absorb() -> None:
            nonlocal granted
            while stream.buffered >= 8:
                granted = max(granted, P.U64.unpack(stream.take_exactly(8))[0])

        def gone() -> bool:
            return stream.stopped or stream.error is not None or conn.closing

        sent = 0

        def may_send() -> bool:
            absorb()
            return granted > sent or gone()

        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_when, conn, gone, tg.cancel_scope)
            try:
                async for chunk in blob.body:
                    if not chunk:
                        continue
                    if count is not None and sent + len(chunk) > count:
                        raise BlobSourceError(f"the body of {digest} is longer than {count} bytes")
                    view = memoryview(chunk)
                    while view:
                        absorb()
                        if granted <= sent:
                            await conn.wait(may_send)
                        if gone():
                            return False
                        piece = view[: granted - sent]
                        conn.send(stream, bytes(piece))
                        sent += len(piece)
                        view = view[len(piece) :]
            except BlobSourceError:
                raise
            except Exception as exc:
                raise BlobSourceError(
                    f"the body of {digest} failed after {sent} bytes: {exc!r}"
                ) from exc
            finally:
                tg.cancel_scope.cancel()
        if gone():
            return False
        if count is not None and sent != count:
            raise BlobSourceError(f"the body of {digest} ended after {sent} of {count} bytes")
        conn.send(stream, b"", end=True)
        return True


async def _cancel_when(conn: QuicConn, predicate: Any, scope: anyio.CancelScope) -> None:
    await conn.wait(predicate)
    scope.cancel()


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


def parse_address(url: str) -> tuple[str, int]:
    """``quic://host:port`` -> ``(host, port)``; anything else is a UsageError."""
    if not isinstance(url, str):
        raise UsageError(f"a peer address URL is a string, got {type(url).__name__}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"malformed peer address {url!r}: {exc}") from None
    host = parts.hostname
    if parts.scheme != "quic" or not host or port is None:
        raise UsageError(f"a quic peer address is quic://host:port, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise UsageError(f"a quic peer address has no path, query or user, got {url!r}")
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    return host, port


def _describe(address: PeerAddress) -> str:
    if address.node_id:
        return f"{address.url} (node {address.node_id[:16]})"
    return address.url


def _detail(body: bytes) -> str:
    text = body[:_DETAIL_BYTES].decode("utf-8", "replace").strip()
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return f": {text}" if text else ""


def _grow_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
