"""A TCP proxy on 127.0.0.1 for tests, which can cut connections that carry given bytes.

``GatedProxy(target_port, cut=b'"type":"GET_BLOCKS"')`` forwards every connection to
``127.0.0.1:target_port``; while :attr:`cutting` is true, a connection whose client bytes
contain ``cut`` is closed before those bytes reach the target (the client sees the peer
go away). Runs an asyncio loop in a thread; ``with`` starts and stops it.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from .net import LOCALHOST

__all__ = ["GatedProxy", "ThreadedProxy"]


class ThreadedProxy(ABC):
    """A TCP proxy on 127.0.0.1 to ``target_port``: an asyncio server in a thread of its
    own, each connection served by :meth:`_handle`; ``with`` starts and stops it."""

    def __init__(self, target_port: int, *, port: int = 0, name: str = "proxy") -> None:
        self.target_port = target_port
        self.port = port
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()

    @property
    def host(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def _started(self) -> None:  # noqa: B027 - a hook; most proxies need nothing here
        """Called in the server's loop once it listens (before any connection)."""

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def main() -> None:
            self._server = await asyncio.start_server(self._handle, LOCALHOST, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
            self._started()
            self._ready.set()
            try:
                await self._server.serve_forever()
            except asyncio.CancelledError:
                pass
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    @abstractmethod
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection."""

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is not None and server is not None and not loop.is_closed():
            loop.call_soon_threadsafe(server.close)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class GatedProxy(ThreadedProxy):
    def __init__(self, target_port: int, *, cut: bytes, port: int = 0) -> None:
        super().__init__(target_port, port=port, name="gated-proxy")
        self.cut = cut
        self.cutting = True
        self.cut_count = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(LOCALHOST, self.target_port)
        except OSError:
            writer.close()
            return

        async def client_to_target() -> None:
            tail = b""
            while data := await reader.read(65536):
                window = tail + data
                if self.cutting and self.cut in window:
                    self.cut_count += 1
                    raise ConnectionResetError("cut")
                tail = window[-len(self.cut):]
                up_writer.write(data)
                await up_writer.drain()
            up_writer.write_eof()

        async def target_to_client() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()

        tasks = [asyncio.ensure_future(client_to_target()),
                 asyncio.ensure_future(target_to_client())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.exception()  # retrieve it
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                w.transport.abort()
