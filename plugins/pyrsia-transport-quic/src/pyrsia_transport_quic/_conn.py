"""One QUIC connection driven from anyio: aioquic's sans-I/O ``QuicConnection`` plus streams.

The runner is thin (STYLE P3, P10): datagrams in go to ``receive_datagram(now=)``, the
machine's events update per-stream buffers, ``datagrams_to_send(now)`` goes out on a
non-blocking UDP socket, and ``get_timer()`` / ``handle_timer(now)`` drive retransmission,
acks, pacing and the idle timeout. ``now`` is always ``anyio.current_time()``.

Two drivers share that core:

* :class:`ServerConn`: the server's endpoint reads its one socket in a task and feeds
  each connection; a timer task per connection handles its deadlines. Waiting on a
  stream is waiting for the next batch.
* :class:`ClientConn`: a client has no task group of its own, so whoever waits on the
  connection drives it (one at a time, under a lock): it waits until the socket is
  readable or the timer is due, feeds the machine, and wakes the other waiters. Any
  task that queues data transmits at once and pokes the driver to recompute its timer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import anyio
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

__all__ = ["ClientConn", "QuicConn", "ServerConn", "Stream"]

logger = logging.getLogger("pyrsia.transport.quic")

#: Most datagrams read in one batch before the connections are serviced.
_BATCH: Final = 256
#: Application error codes (RESET_STREAM / STOP_SENDING).
CANCELLED: Final = 0x10
FAILED: Final = 0x11

Address = tuple[Any, ...]


class Stream:
    """The receive buffer and state of one bidirectional stream."""

    __slots__ = ("buffered", "chunks", "ended", "error", "id", "received", "stopped")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.received = 0
        self.ended = False  # the peer finished its side (FIN)
        self.error: str | None = None  # the peer reset its side, or the connection died
        self.stopped = False  # the peer asked us to stop sending

    def feed(self, data: bytes, end: bool) -> None:
        if self.error is not None:
            return
        if data:
            self.chunks.append(data)
            self.buffered += len(data)
            self.received += len(data)
        if end:
            self.ended = True

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` buffered bytes (all of them joined when they fit)."""
        if not self.chunks or limit <= 0:
            return b""
        parts: list[bytes] = []
        size = 0
        while self.chunks and size < limit:
            chunk = self.chunks.popleft()
            if size + len(chunk) > limit:
                cut = limit - size
                self.chunks.appendleft(chunk[cut:])
                chunk = chunk[:cut]
            parts.append(chunk)
            size += len(chunk)
        self.buffered -= size
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def take_exactly(self, count: int) -> bytes:
        if count > self.buffered:
            raise ValueError(f"only {self.buffered} of {count} bytes are buffered")
        return self.take(count)

    @property
    def done(self) -> bool:
        """Everything has arrived (FIN), or nothing more will (failed)."""
        return self.ended or self.error is not None

    @property
    def finished(self) -> bool:
        """Nothing more will come: ended (and drained) or failed."""
        return self.error is not None or (self.ended and not self.chunks)


class QuicConn:
    """A ``QuicConnection``, its streams, and a way to send its datagrams."""

    def __init__(self, quic: QuicConnection, where: str) -> None:
        self.quic = quic
        self.where = where
        self.streams: dict[int, Stream] = {}
        self.handshake_done = False
        self.terminated: str | None = None
        self.last_received = anyio.current_time()
        self.last_sent = anyio.current_time()
        self._changed = anyio.Event()
        self._wait_scope: anyio.CancelScope | None = None
        self.dropped_datagrams = 0

    # -- the machine

    @property
    def closing(self) -> bool:
        """Terminated, or closing (after a CONNECTION_CLOSE either way)."""
        return (
            self.terminated is not None or getattr(self.quic, "_close_event", None) is not None
        )

    def receive(self, data: bytes, addr: Address, now: float) -> None:
        self.quic.receive_datagram(data, addr, now=now)
        self.last_received = now

    def handle_timer_if_due(self, now: float) -> None:
        timer = self.quic.get_timer()
        if timer is not None and now >= timer:
            self.quic.handle_timer(now=now)

    def process(self) -> None:
        """Apply the machine's events to the streams, then wake every waiter."""
        while (event := self.quic.next_event()) is not None:
            self._event(event)
        self.notify()

    def _event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                stream = self._new_stream(event.stream_id)
                if stream is None:
                    return
            stream.feed(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.error is None:
                stream.error = f"the peer reset the stream (code {event.error_code:#x})"
        elif isinstance(event, events.StopSendingReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.stopped = True
        elif isinstance(event, events.HandshakeCompleted):
            self.handshake_done = True
        elif isinstance(event, events.ConnectionTerminated):
            reason = event.reason_phrase or f"code {event.error_code:#x}"
            self._terminate(f"the connection was closed ({reason})")
        else:
            self._other_event(event)

    def _new_stream(self, stream_id: int) -> Stream | None:
        return None  # clients only read the streams they opened

    def _other_event(self, event: events.QuicEvent) -> None:
        pass

    def _terminate(self, reason: str) -> None:
        if self.terminated is None:
            self.terminated = reason
        for stream in self.streams.values():
            if stream.error is None:
                stream.error = reason
        self.notify()

    def notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def kick(self) -> None:
        """The timer may have moved: make the driver look again."""
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    # -- sending

    def transmit(self) -> None:
        now = anyio.current_time()
        try:
            datagrams = self.quic.datagrams_to_send(now=now)
        except Exception:  # a machine bug must not kill the caller's task
            logger.exception("QUIC connection to %s failed to build datagrams", self.where)
            self._terminate("the connection failed")
            return
        for data, addr in datagrams:
            try:
                self._send(data, addr)
            except BlockingIOError:
                self.dropped_datagrams += 1  # a loss; QUIC retransmits
            except OSError as exc:
                self._send_failed(exc)
                return
        if datagrams:
            self.last_sent = now

    def _send(self, data: bytes, addr: Address) -> None:
        raise NotImplementedError

    def _send_failed(self, exc: OSError) -> None:
        logger.debug("Sending to %s failed: %r", self.where, exc)

    def open_stream(self) -> Stream:
        stream_id = self.quic.get_next_available_stream_id()
        stream = self.streams[stream_id] = Stream(stream_id)
        return stream

    def send(self, stream: Stream, data: bytes, end: bool = False) -> None:
        if self.closing:
            return
        try:
            self.quic.send_stream_data(stream.id, data, end_stream=end)
        except Exception as exc:  # the stream was reset or finished under us
            if stream.error is None:
                stream.error = f"cannot send on the stream ({exc})"
            self.notify()
            return
        self.transmit()
        self.kick()

    def forget(self, stream: Stream, *, complete: bool) -> None:
        """Drop a stream; unless it ran to completion, tell the peer to stop both ways."""
        self.streams.pop(stream.id, None)
        if complete or self.closing:
            return
        with contextlib.suppress(Exception):  # best effort: the stream may be half-closed
            self.quic.reset_stream(stream.id, CANCELLED)
        with contextlib.suppress(Exception):
            self.quic.stop_stream(stream.id, CANCELLED)
        self.transmit()
        self.kick()

    def close(self, reason: str = "closing") -> None:
        """Send CONNECTION_CLOSE (best effort) and fail every stream."""
        if not self.closing:
            with contextlib.suppress(Exception):
                self.quic.close(error_code=0, reason_phrase=reason)
                self.transmit()
        self._terminate(f"the connection was closed ({reason})")

    # -- waiting

    async def wait(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` or the connection terminates."""
        raise NotImplementedError


class ServerConn(QuicConn):
    """A connection accepted by the server's endpoint; the endpoint's tasks drive it."""

    def __init__(
        self,
        quic: QuicConnection,
        where: str,
        sock: socket.socket,
        on_stream: Callable[[ServerConn, Stream], None],
        on_cid: Callable[[ServerConn, bytes, bool], None],
    ) -> None:
        super().__init__(quic, where)
        self._sock = sock
        self._on_stream = on_stream
        self._on_cid = on_cid
        self._highest_stream = -1

    def _send(self, data: bytes, addr: Address) -> None:
        self._sock.sendto(data, addr)

    def _new_stream(self, stream_id: int) -> Stream | None:
        # Client-initiated bidirectional streams only, each once (late bytes of a stream
        # already served are dropped; stream ids only grow).
        if stream_id % 4 != 0 or stream_id <= self._highest_stream or self.closing:
            return None
        self._highest_stream = stream_id
        stream = self.streams[stream_id] = Stream(stream_id)
        self._on_stream(self, stream)
        return stream

    def _other_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionIdIssued):
            self._on_cid(self, event.connection_id, True)
        elif isinstance(event, events.ConnectionIdRetired):
            self._on_cid(self, event.connection_id, False)

    async def wait(self, predicate: Callable[[], bool]) -> None:
        while not predicate() and self.terminated is None:
            changed = self._changed
            await changed.wait()

    async def run_timer(self) -> None:
        """Handle the machine's deadlines until the connection terminates."""
        while self.terminated is None:
            timer = self.quic.get_timer()
            with anyio.CancelScope(deadline=math.inf if timer is None else timer) as scope:
                self._wait_scope = scope
                try:
                    await anyio.sleep_forever()
                finally:
                    self._wait_scope = None
            now = anyio.current_time()
            if timer is not None and now >= timer:
                self.quic.handle_timer(now=now)
                self.process()
                self.transmit()


class ClientConn(QuicConn):
    """A client's connection on its own connected UDP socket; driven by its waiters."""

    def __init__(self, quic: QuicConnection, where: str, sock: socket.socket) -> None:
        super().__init__(quic, where)
        self.sock = sock
        self.peer: Address = sock.getpeername()
        self._lock = anyio.Lock()

    def _send(self, data: bytes, addr: Address) -> None:
        self.sock.send(data)

    def _send_failed(self, exc: OSError) -> None:
        self._terminate(f"the peer is unreachable ({exc.strerror or exc})")

    def pump(self) -> None:
        """Feed everything the socket holds and any due timer; then transmit."""
        now = anyio.current_time()
        for _ in range(_BATCH):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:  # ECONNREFUSED: nobody listens there
                self._terminate(f"the peer is unreachable ({exc.strerror or exc})")
                return
            self.receive(data, self.peer, now)
        self.handle_timer_if_due(now)
        self.process()
        self.transmit()
        self.kick()  # a driver blocked on the socket re-checks what it waits for

    async def wait(self, predicate: Callable[[], bool]) -> None:
        while not predicate() and self.terminated is None:
            if self._lock.locked():  # another task drives; wait for its next batch
                changed = self._changed
                await changed.wait()
                continue
            try:
                async with self._lock:
                    await self._step()
            finally:
                self.notify()  # a driver that was cancelled hands over to the others

    async def _step(self) -> None:
        timer = self.quic.get_timer()
        with anyio.CancelScope(deadline=math.inf if timer is None else timer) as scope:
            self._wait_scope = scope
            try:
                await anyio.wait_readable(self.sock)
            except (anyio.ClosedResourceError, OSError) as exc:
                self._terminate(f"the connection was closed ({type(exc).__name__})")
                return
            finally:
                self._wait_scope = None
        self.pump()

    def aclose_now(self) -> None:
        self.close()
        if self.sock.fileno() >= 0:
            anyio.notify_closing(self.sock)
            self.sock.close()
