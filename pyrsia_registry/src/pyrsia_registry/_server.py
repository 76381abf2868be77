"""A small HTTP/1.1 server for ASGI 3 apps (anyio + h11) with zero-copy file responses.

The node's apps stay plain ASGI callables, so any ASGI server can host them; this one exists
because blob serving must run at ``sendfile`` speed, which the general-purpose servers did not
reach on this workload (see ``bench/bench_serve.py``).

Protocol:

* HTTP/1.1 with keep-alive; pipelined requests are answered one after the other.
* Request bodies are streamed to ``receive()``; ``http.disconnect`` is delivered when the client
  goes away (and, per ASGI, once the response is complete).
* ``HEAD``: the app answers as for ``GET``; the server sends the headers and never a body.
* A response without ``Content-Length`` is sent chunked.
* A malformed request, including a TLS ClientHello sent to this plain-HTTP port, gets a ``400``
  (``431`` for a request head over ``max_header_size``) and the connection is closed.
* An exception in the app becomes a ``500`` if nothing was sent yet; it is logged on the
  ``pyrsia.server`` logger either way.
* Lifespan (``startup``/``shutdown``) is run when the app supports it.

Zero-copy extensions, announced in ``scope["extensions"]``:

* ``"http.response.pathsend"`` (ASGI): after ``http.response.start``, the app sends
  ``{"type": "http.response.pathsend", "path": "/abs/path"}``; the whole file is the body.
* ``"pyrsia.sendfile"``: ``{"type": "pyrsia.sendfile", "path": str, "offset": int,
  "count": int, "more_body": bool = False}`` sends ``count`` bytes from ``offset`` (e.g. a 206
  Range response). ``count`` defaults to the rest of the file. With ``more_body`` the response
  stays open for further body messages.

Both open the file before anything is written, so a missing file becomes a ``500`` (or whatever
the app answers after catching the ``OSError`` that ``send()`` raises), never a half response.
``send()`` raises :class:`ClientDisconnected` (an ``OSError``) once the client has gone.
"""

from __future__ import annotations

import email.utils
import http
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Literal, cast
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc
import h11
from anyio.abc import SocketAttribute
from pyrsia_core.errors import TransferAborted

from ._sendfile import FileTruncatedError, sendfile

__all__ = [
    "PATHSEND",
    "SENDFILE",
    "ASGIApp",
    "ClientDisconnected",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "Server",
    "serve",
]

logger = logging.getLogger("pyrsia.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: ASGI message type / scope extension of the standard path-send extension.
PATHSEND: Final = "http.response.pathsend"
#: Message type / scope extension for zero-copy byte ranges of a file.
SENDFILE: Final = "pyrsia.sendfile"

_READ_SIZE: Final = 64 * 1024
_LINGER_SECONDS: Final = 2.0
_LINGER_BYTES: Final = 1024 * 1024
_HEAD_END: Final = re.compile(rb"\r?\n\r?\n")
_REASONS: Final = {int(s): s.phrase.encode("ascii") for s in http.HTTPStatus}


class ClientDisconnected(OSError):
    """Raised by ``send()`` when the response can no longer reach the client.

    (ASGI 2.4: sending on a closed connection raises a server-specific ``OSError``.)
    """


class _FileSegment:
    """Stands in for body bytes in h11's output: ``count`` bytes of ``fd`` from ``offset``.

    h11's writers only call ``len()`` on data and pass it through
    (``Connection.send_with_data_passthrough``), so framing (Content-Length accounting, chunk
    headers) stays h11's job while the bytes themselves go out with ``sendfile``.
    """

    __slots__ = ("count", "fd", "offset")

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd = fd
        self.offset = offset
        self.count = count

    def __len__(self) -> int:
        return self.count


class Server:
    """Serves one ASGI app over HTTP/1.1 on ``host:port`` until cancelled.

    ``port=0`` binds a free port; after startup it is in :attr:`port`. ``idle_timeout`` bounds
    the wait for (and the reading of) a request head and each read of a request body;
    ``write_timeout`` bounds how long the client may accept no bytes at all.
    On cancellation the server stops accepting, lets in-flight responses finish for up to
    ``shutdown_timeout`` seconds, closes the rest and runs the lifespan shutdown.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 7888,
        idle_timeout: float = 75.0,
        write_timeout: float = 60.0,
        shutdown_timeout: float = 10.0,
        max_header_size: int = 64 * 1024,
        max_drain_size: int = 1024 * 1024,
        lifespan: Literal["auto", "on", "off"] = "auto",
        root_path: str = "",
        backlog: int = 1024,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_header_size = max_header_size
        self.max_drain_size = max_drain_size
        self.lifespan = lifespan
        self.root_path = root_path
        self.backlog = backlog
        #: ``(host, port)`` of every bound socket, once listening.
        self.addresses: list[tuple[str, int]] = []
        self.state: dict[str, Any] = {}
        self._connections: set[_Connection] = set()
        self._shutting_down = False
        self._all_closed = anyio.Event()
        self._date = (0, b"")

    async def serve(
        self,
        *,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
        ready: anyio.Event | None = None,
    ) -> None:
        """Run until cancelled. Reports the bound port through ``task_status`` and sets
        ``ready`` once the lifespan startup is done and the sockets listen."""
        self._shutting_down = False
        self._all_closed = anyio.Event()
        life = _Lifespan(self.app, self.lifespan, self.state)
        try:
            async with anyio.create_task_group() as tg:
                if self.lifespan != "off":
                    await life.startup(tg)
                try:
                    await self._listen(task_status, ready)
                finally:
                    with anyio.CancelScope(shield=True):
                        await life.shutdown()
                    tg.cancel_scope.cancel()
        finally:
            life.close()

    async def _listen(
        self, task_status: anyio.abc.TaskStatus[int], ready: anyio.Event | None
    ) -> None:
        listener = await anyio.create_tcp_listener(
            local_host=self.host, local_port=self.port, backlog=self.backlog
        )
        try:
            self.addresses = [
                cast(tuple[str, int], lis.extra(SocketAttribute.local_address)[:2])
                for lis in listener.listeners
            ]
            self.port = self.addresses[0][1]
            logger.info("Listening on %s", ", ".join(f"http://{h}:{p}" for h, p in self.addresses))
            async with anyio.create_task_group() as conns:
                try:
                    for lis in listener.listeners:
                        sock_listener = cast(anyio.abc.SocketListener, lis)
                        conns.start_soon(self._accept_loop, sock_listener, conns)
                    task_status.started(self.port)
                    if ready is not None:
                        ready.set()
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        await listener.aclose()  # stop accepting first
                        await self._drain(conns)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    async def _accept_loop(
        self, listener: anyio.abc.SocketListener, conns: anyio.abc.TaskGroup
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return
            except OSError as exc:  # EMFILE and friends: back off, don't die
                logger.warning("accept() failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            conns.start_soon(self._handle_stream, stream)

    async def _handle_stream(self, stream: anyio.abc.SocketStream) -> None:
        # Shielded, so that cancelling serve() reaches connections only through _drain().
        with anyio.CancelScope(shield=True) as scope:
            if self._shutting_down:
                await _aclose_quietly(stream)
                return
            conn = _Connection(self, stream, scope)
            self._connections.add(conn)
            try:
                await conn.run()
            finally:
                self._connections.discard(conn)
                if self._shutting_down and not self._connections:
                    self._all_closed.set()

    async def _drain(self, conns: anyio.abc.TaskGroup) -> None:
        """Graceful stop: idle connections close now, busy ones after their response."""
        self._shutting_down = True
        for conn in list(self._connections):
            conn.begin_shutdown()
        if self._connections:
            with anyio.move_on_after(self.shutdown_timeout):
                await self._all_closed.wait()
        for conn in list(self._connections):
            conn.scope.cancel()
        conns.cancel_scope.cancel()

    def _http_date(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True).encode("ascii"))
        return self._date[1]


async def serve(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 7888,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ready: anyio.Event | None = None,
    **options: Any,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; ``options`` go to :class:`Server`.

    Use ``port = await task_group.start(serve, app, "127.0.0.1", 0)`` to learn a free port.
    """
    await Server(app, host=host, port=port, **options).serve(task_status=task_status, ready=ready)


class _Lifespan:
    """Runs the ASGI lifespan protocol in a task of the server's task group."""

    def __init__(self, app: ASGIApp, mode: Literal["auto", "on", "off"], state: dict[str, Any]):
        self.app = app
        self.mode = mode
        self.state = state
        send, receive = anyio.create_memory_object_stream[Message](2)
        self._to_app = send
        self._app_inbox = receive
        self._reply: Message | None = None
        self._replied = anyio.Event()
        self._done = anyio.Event()
        self._supported = False

    async def startup(self, tg: anyio.abc.TaskGroup) -> None:
        tg.start_soon(self._run)
        await self._to_app.send({"type": "lifespan.startup"})
        await self._wait_reply()
        reply = self._reply
        if reply is None:  # the app returned or raised without answering
            if self.mode == "on":
                raise RuntimeError("the ASGI app does not support the lifespan protocol")
            logger.debug("ASGI lifespan protocol not supported by the app; continuing")
            return
        if reply["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"ASGI lifespan startup failed: {reply.get('message', '')}")
        self._supported = True

    async def shutdown(self) -> None:
        if not self._supported or self._done.is_set():
            return
        self._reply = None
        self._replied = anyio.Event()
        with anyio.move_on_after(10):
            await self._to_app.send({"type": "lifespan.shutdown"})
            await self._wait_reply()
            if self._reply is not None and self._reply["type"] == "lifespan.shutdown.failed":
                logger.error("ASGI lifespan shutdown failed: %s", self._reply.get("message", ""))

    def close(self) -> None:
        self._to_app.close()
        self._app_inbox.close()

    async def _wait_reply(self) -> None:
        async with anyio.create_task_group() as tg:

            async def until_done() -> None:
                await self._done.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(until_done)
            await self._replied.wait()
            tg.cancel_scope.cancel()

    async def _run(self) -> None:
        scope: Scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self.app(scope, self._receive, self._send)
        except Exception:
            if self.mode == "on" or self._supported:
                logger.exception("Exception in the ASGI lifespan protocol")
            else:
                logger.debug("ASGI lifespan protocol not supported by the app", exc_info=True)
        finally:
            self._done.set()

    async def _receive(self) -> Message:
        return await self._app_inbox.receive()

    async def _send(self, message: Message) -> None:
        self._reply = message
        self._replied.set()


class _Connection:
    """One client connection: a loop of request/response cycles over one h11 machine."""

    def __init__(
        self, server: Server, stream: anyio.abc.SocketStream, scope: anyio.CancelScope
    ) -> None:
        self.server = server
        self.stream = stream
        self.scope = scope
        self.sock = stream.extra(SocketAttribute.raw_socket)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_header_size)
        self.client = _address(stream.extra(SocketAttribute.remote_address, None))
        self.local = _address(stream.extra(SocketAttribute.local_address, None))
        self.write_lock = anyio.Lock()
        self.closing = False  # answer the current request, then close
        self.broken = False  # the socket is unusable: no more reads or writes
        self.peer_eof = False
        self.linger = False  # we close with the client possibly still sending: see close()
        self.idle_scope: anyio.CancelScope | None = None

    def begin_shutdown(self) -> None:
        self.closing = True
        if self.idle_scope is not None:
            self.idle_scope.cancel()

    async def run(self) -> None:
        try:
            while not self.closing:
                event: object = None
                with anyio.CancelScope(
                    deadline=anyio.current_time() + self.server.idle_timeout
                ) as idle:
                    self.idle_scope = idle
                    event = await self.next_event()
                self.idle_scope = None
                if type(event) is not h11.Request:  # EOF, idle timeout or shutdown
                    if idle.cancelled_caught and not self.closing and self.h11.trailing_data[0]:
                        self.linger = True  # a request head that never completed
                        await self.send_simple(408, b"Request Timeout")
                    break
                cycle = _Cycle(self, event)
                await cycle.run()
                if not self.keep_alive():
                    self.linger = True
                    break
                self.h11.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self.reject(exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            logger.debug("connection from %s failed: %r", self.client, exc)
            self.broken = True
        finally:
            await self.close()

    def keep_alive(self) -> bool:
        return (
            not self.closing
            and not self.broken
            and self.h11.our_state is h11.DONE
            and self.h11.their_state is h11.DONE
        )

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        """The next event from the client, reading the socket as needed; EOF → ConnectionClosed."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", event)
            self.h11.receive_data(await self.read())
            if self.h11.their_state is h11.IDLE:
                self.check_head_size()

    def check_head_size(self) -> None:
        """Enforce ``max_header_size`` on the request head exactly.

        h11 only limits its buffer while an event is incomplete, so a head a little over the
        limit that completes within one read would pass.
        """
        limit = self.server.max_header_size
        buffered = self.h11.trailing_data[0]
        if len(buffered) > limit and _HEAD_END.search(buffered, 0, limit + 4) is None:
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)

    async def read(self) -> bytes:
        """Some bytes from the client; ``b""`` at EOF or when the connection broke."""
        if self.peer_eof or self.broken:
            return b""
        try:
            return await self.stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            self.peer_eof = True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self.peer_eof = True
            self.broken = True
        return b""

    async def write(self, data: bytes) -> None:
        with anyio.move_on_after(self.server.write_timeout) as timeout:
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.broken = True
                raise ClientDisconnected(f"client {self.client} went away") from exc
        if timeout.cancelled_caught:
            self.broken = True
            raise ClientDisconnected(f"client {self.client} stopped reading")

    async def write_pieces(self, pieces: list[Any]) -> None:
        """Write h11's output; :class:`_FileSegment` items go out with ``sendfile``."""
        async with self.write_lock:
            if self.broken:
                raise ClientDisconnected(f"client {self.client} went away")
            buf: list[bytes] = []
            try:
                for piece in pieces:
                    if type(piece) is _FileSegment:
                        if buf:
                            await self.write(b"".join(buf))
                            buf.clear()
                        await self.sendfile(piece)
                    else:
                        buf.append(piece)
                if buf:
                    await self.write(b"".join(buf))
            except BaseException:
                self.broken = True
                if self.h11.our_state is not h11.ERROR:
                    self.h11.send_failed()
                raise

    async def sendfile(self, segment: _FileSegment) -> None:
        try:
            await sendfile(
                self.sock,
                segment.fd,
                segment.offset,
                segment.count,
                stall_timeout=self.server.write_timeout,
            )
        except FileTruncatedError:
            raise
        except TimeoutError as exc:
            raise ClientDisconnected(f"client {self.client} stopped reading") from exc
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ClientDisconnected(f"client {self.client} went away") from exc

    async def reject(self, exc: h11.RemoteProtocolError) -> None:
        """Answer an unparsable request (a TLS ClientHello, garbage, a huge head) and close."""
        status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
        logger.debug("bad request from %s: %s (answering %d)", self.client, exc, status)
        self.closing = True
        self.linger = True
        if self.broken or self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self.send_simple(status, _REASONS.get(status, b"Bad Request"))
        except (ClientDisconnected, h11.LocalProtocolError):
            pass

    async def send_simple(self, status: int, text: bytes) -> None:
        """A complete small ``text/plain`` response that closes the connection."""
        body = text + b"\n"
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"date", self.server._http_date()),
            (b"connection", b"close"),
        ]
        self.closing = True
        data = self.h11.send(
            h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))
        )
        data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.write_pieces([data])

    async def close(self) -> None:
        """Close the socket; if we end the connection, first let the client read our answer.

        Closing with unread request bytes in our receive buffer makes the kernel send a RST,
        which can destroy the response the client has not read yet (the TLS probe of the
        docker CLI reads our ``400`` that way). So we half-close and discard input briefly.
        """
        with anyio.CancelScope(shield=True):
            if self.linger and not (self.broken or self.peer_eof or self.scope.cancel_called):
                with anyio.move_on_after(_LINGER_SECONDS):
                    try:
                        await self.stream.send_eof()
                        discarded = 0
                        while discarded < _LINGER_BYTES:
                            discarded += len(await self.stream.receive(_READ_SIZE))
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        pass
                    except anyio.ClosedResourceError:
                        pass
            await _aclose_quietly(self.stream)


class _Cycle:
    """One request and its response, as seen by the app through ``receive`` and ``send``."""

    def __init__(self, conn: _Connection, request: h11.Request) -> None:
        self.conn = conn
        self.h11 = conn.h11
        self.request = request
        self.head = request.method == b"HEAD"
        self.body_done = False  # h11 has seen the end of the request body
        self.body_delivered = False  # ... and the app has received it
        self.pending: h11.Data | None = None
        self.start: Message | None = None
        self.response_sent = False  # h11 has produced (and we began writing) the head
        self.complete = False
        self.finished = anyio.Event()  # response complete or client gone
        self.watching = False
        self.task_group: anyio.abc.TaskGroup | None = None

    async def run(self) -> None:
        conn = self.conn
        self.peek_body()
        scope = self.build_scope()
        async with anyio.create_task_group() as tg:
            self.task_group = tg
            if self.body_done:
                self.watch()
            try:
                await conn.server.app(scope, self.receive, self.send)
            except ClientDisconnected as exc:
                logger.debug("client %s disconnected: %s", conn.client, exc)
            except TransferAborted as exc:
                # A blob in flight failed verification (logged where it was cut): the
                # response ends short of its Content-Length and the connection closes.
                logger.debug("response to %s cut short: %s", conn.client, exc)
                await self.fail()
            except Exception:
                logger.exception(
                    "Exception in ASGI application (%s %s)",
                    self.request.method.decode("ascii", "replace"),
                    self.request.target.decode("ascii", "replace"),
                )
                await self.fail()
            else:
                if not self.complete and (conn.broken or self.finished.is_set()):
                    logger.debug("client %s went away during the response", conn.client)
                elif not self.complete:
                    if self.start is None:
                        logger.error("ASGI callable returned without starting a response")
                    else:
                        logger.error("ASGI callable returned without completing the response")
                    await self.fail()
            finally:
                self.finished.set()
                tg.cancel_scope.cancel()
        if self.complete and self.h11.their_state is h11.SEND_BODY:
            await self.drain_body()

    async def fail(self) -> None:
        """After an app error: a 500 if no byte of the response was written, else close."""
        conn = self.conn
        conn.closing = True
        if self.response_sent or conn.broken or self.h11.our_state is not h11.SEND_RESPONSE:
            conn.broken = True  # the response is cut short; the client must see the close
            return
        self.response_sent = True
        try:
            await conn.send_simple(500, b"Internal Server Error")
        except (ClientDisconnected, h11.LocalProtocolError):
            conn.broken = True

    def build_scope(self) -> Scope:
        req = self.request
        target = req.target
        if not target.startswith(b"/") and b"://" in target:  # absolute-form
            parts = urlsplit(target)
            target = (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")
        raw_path, _, query = target.partition(b"?")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": req.http_version.decode("ascii"),
            "method": req.method.decode("ascii"),
            "scheme": "http",
            "path": unquote(raw_path.decode("ascii")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": self.conn.server.root_path,
            "headers": list(req.headers),
            "client": self.conn.client,
            "server": self.conn.local,
            "state": dict(self.conn.server.state),
            "extensions": {PATHSEND: {}, SENDFILE: {}},
        }

    # -- request body ---------------------------------------------------------------------

    def peek_body(self) -> None:
        """Consume what h11 already has of the body without reading the socket."""
        if self.body_done or self.pending is not None:
            return
        event = self.h11.next_event()
        if type(event) is h11.EndOfMessage:
            self.body_done = True
        elif type(event) is h11.Data:
            self.pending = event

    def watch(self) -> None:
        if not self.watching and self.task_group is not None:
            self.watching = True
            self.task_group.start_soon(self.watch_disconnect)

    async def watch_disconnect(self) -> None:
        """Read ahead while the app runs, to notice the client leaving.

        Bytes read are the client's next (pipelined) request: h11 keeps them for the next
        cycle. We stop reading once a request head's worth is buffered.
        """
        conn = self.conn
        while len(self.h11.trailing_data[0]) <= conn.server.max_header_size:
            data = await conn.read()
            self.h11.receive_data(data)
            if not data:
                self.finished.set()
                return

    async def receive(self) -> Message:
        if self.complete or self.finished.is_set():
            return {"type": "http.disconnect"}
        if not self.body_delivered:
            try:
                return await self.receive_body()
            except (h11.RemoteProtocolError, TimeoutError) as exc:
                logger.debug("reading the request body from %s failed: %r", self.conn.client, exc)
                self.conn.closing = True
                self.finished.set()
                return {"type": "http.disconnect"}
        await self.finished.wait()
        return {"type": "http.disconnect"}

    async def receive_body(self) -> Message:
        conn = self.conn
        event: object
        if self.pending is not None:
            event = self.pending
            self.pending = None
        elif self.body_done:
            event = h11.EndOfMessage()
        else:
            if self.h11.they_are_waiting_for_100_continue and not self.response_sent:
                info = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                await conn.write_pieces([self.h11.send(info)])
            with anyio.fail_after(conn.server.idle_timeout):
                event = await conn.next_event()
        if type(event) is h11.Data:
            self.peek_body()
            more = not self.body_done
            if not more:
                self.body_delivered = True
                self.watch()
            return {"type": "http.request", "body": bytes(event.data), "more_body": more}
        if type(event) is h11.EndOfMessage:
            self.body_done = self.body_delivered = True
            self.watch()
            return {"type": "http.request", "body": b"", "more_body": False}
        raise h11.RemoteProtocolError(f"unexpected event while reading a body: {event!r}")

    async def drain_body(self) -> None:
        """Read and drop a body the app did not read, so the connection can be reused."""
        conn = self.conn
        dropped = 0
        try:
            with anyio.fail_after(conn.server.idle_timeout):
                while dropped <= conn.server.max_drain_size:
                    event = self.pending if self.pending is not None else await conn.next_event()
                    self.pending = None
                    if type(event) is h11.EndOfMessage:
                        return
                    if type(event) is not h11.Data:
                        break
                    dropped += len(event.data)
        except (h11.RemoteProtocolError, TimeoutError):
            pass
        conn.closing = True

    # -- response -------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.complete:
            if self.conn.broken:
                raise ClientDisconnected(f"client {self.conn.client} went away")
            raise RuntimeError(f"ASGI message {kind!r} after the response was complete")
        if self.conn.broken:
            raise ClientDisconnected(f"client {self.conn.client} went away")
        if kind == "http.response.start":
            if self.start is not None:
                raise RuntimeError("http.response.start sent twice")
            self.start = message
            return
        if self.start is None:
            raise RuntimeError(f"ASGI message {kind!r} before http.response.start")
        if kind == "http.response.body":
            body = message.get("body", b"")
            more = bool(message.get("more_body", False))
            pieces = self.head_pieces()
            if body and not self.head:
                pieces += self.h11.send_with_data_passthrough(h11.Data(data=body)) or []
            await self.finish(pieces, more)
        elif kind == PATHSEND:
            await self.send_file(os.fspath(message["path"]), 0, None, False)
        elif kind == SENDFILE:
            await self.send_file(
                os.fspath(message["path"]),
                int(message.get("offset", 0)),
                None if message.get("count") is None else int(message["count"]),
                bool(message.get("more_body", False)),
            )
        else:
            raise RuntimeError(f"unexpected ASGI message type {kind!r}")

    async def send_file(self, path: str, offset: int, count: int | None, more: bool) -> None:
        if self.head:
            await self.finish(self.head_pieces(), more)
            return
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(fd).st_size
            if count is None:
                count = size - offset
            if offset < 0 or count < 0 or offset + count > size:
                raise ValueError(f"byte range {offset}+{count} outside {path!r} ({size} bytes)")
            pieces = self.head_pieces()
            if count:
                segment = _FileSegment(fd, offset, count)
                pieces += (
                    self.h11.send_with_data_passthrough(h11.Data(data=cast(bytes, segment))) or []
                )
            await self.finish(pieces, more)
        finally:
            os.close(fd)

    def head_pieces(self) -> list[Any]:
        """h11's bytes for the response head, the first time a body message comes."""
        if self.response_sent:
            return []
        assert self.start is not None
        conn = self.conn
        headers: list[tuple[bytes, bytes]] = [
            (bytes(k), bytes(v)) for k, v in self.start.get("headers", ())
        ]
        names = {k.lower() for k, _ in headers}
        if b"date" not in names:
            headers.append((b"date", conn.server._http_date()))
        if conn.closing or conn.server._shutting_down:
            conn.closing = True
            headers.append((b"connection", b"close"))
        status = int(self.start["status"])
        response = h11.Response(
            status_code=status, headers=headers, reason=_REASONS.get(status, b"")
        )
        pieces = self.h11.send_with_data_passthrough(response) or []
        self.response_sent = True
        return pieces

    async def finish(self, pieces: list[Any], more: bool) -> None:
        if not more:
            pieces += self.h11.send_with_data_passthrough(h11.EndOfMessage()) or []
        if pieces:
            await self.conn.write_pieces(pieces)
        if not more:
            self.complete = True
            self.finished.set()


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None


async def _aclose_quietly(stream: anyio.abc.SocketStream) -> None:
    try:
        await stream.aclose()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
