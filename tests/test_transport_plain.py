"""``PlainHttpTransport``: httpx's API over raw socket reads, against scripted servers on
127.0.0.1 (each test's server says exactly what goes on the wire)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpx
import pytest
from pyrsia_transport_http import PlainHttpTransport
from support.net import free_port

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
Handler = Callable[["Conn"], Awaitable[None]]


class Conn:
    """One accepted connection of a scripted server."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def request(self) -> tuple[bytes, bytes] | None:
        """The next request's head and body (by its Content-Length); None at EOF."""
        while b"\r\n\r\n" not in self.buf:
            try:
                self.buf += await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buf) < length:
            self.buf += await self.stream.receive()
        body, self.buf = self.buf[:length], self.buf[length:]
        return head, body


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[Conn]]]:
    """``(base URL, accepted connections)`` of a server running ``handler`` per connection."""
    accepted: list[Conn] = []

    async def serve(stream: anyio.abc.SocketStream) -> None:
        conn = Conn(stream)
        accepted.append(conn)
        async with stream:
            with contextlib.suppress(anyio.BrokenResourceError):  # a client that left
                await handler(conn)

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            try:
                yield f"http://127.0.0.1:{port}", accepted
            finally:
                tg.cancel_scope.cancel()


def data_of(size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d" % counter).digest()
        counter += 1
    return bytes(out[:size])


def client(transport: PlainHttpTransport | None = None, **kwargs: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=transport or PlainHttpTransport(), trust_env=False,
                             **kwargs)  # type: ignore[arg-type]


async def test_bodies_of_known_length_arrive_whole_and_the_connection_is_kept() -> None:
    data = data_of(3 * MiB + 123)

    async def handler(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            head = req[0]
            if head.startswith(b"HEAD"):
                await conn.stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                       % len(data))
            elif head.startswith(b"POST"):
                await conn.stream.send(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s"
                                       % (len(req[1]), req[1]))
            else:
                await conn.stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                                       b"X-Test: yes\r\n\r\n" % len(data) + data)

    with anyio.fail_after(20):
        async with server(handler) as (url, accepted), client() as http:
            async with http.stream("GET", f"{url}/blob") as resp:
                assert resp.status_code == 200 and resp.headers["x-test"] == "yes"
                assert resp.http_version == "HTTP/1.1" and resp.reason_phrase == "OK"
                chunks = [chunk async for chunk in resp.aiter_raw()]
            assert b"".join(chunks) == data
            assert all(len(chunk) <= MiB for chunk in chunks)
            resp2 = await http.get(f"{url}/blob")
            assert resp2.content == data
            head = await http.head(f"{url}/blob")
            assert head.status_code == 200 and head.content == b""
            posted = await http.post(f"{url}/rpc", content=b"frame" * 1000)
            assert posted.status_code == 201 and posted.content == b"frame" * 1000
            assert len(accepted) == 1  # one connection, kept alive throughout


@pytest.mark.parametrize("framing", ["chunked", "until-close"])
async def test_other_framings_are_decoded(framing: str) -> None:
    data = data_of(300_000)

    async def handler(conn: Conn) -> None:
        if await conn.request() is None:
            return
        if framing == "chunked":
            body = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + 70_000]), data[i:i + 70_000])
                            for i in range(0, len(data), 70_000))
            await conn.stream.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   + body + b"0\r\n\r\n")
        else:
            await conn.stream.send(b"HTTP/1.0 200 OK\r\n\r\n" + data)
            await conn.stream.aclose()

    with anyio.fail_after(10):
        async with server(handler) as (url, _), client() as http:
            assert (await http.get(url)).content == data


async def test_a_short_body_is_a_protocol_error_naming_the_counts() -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 400)

    with anyio.fail_after(10):
        async with server(handler) as (url, _), client() as http:
            with pytest.raises(httpx.RemoteProtocolError,
                               match="received 400 bytes, expected 1000"):
                await http.get(url)


async def test_garbage_and_silence_are_errors() -> None:
    async def garbage(conn: Conn) -> None:
        await conn.request()
        await conn.stream.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    async def closes(conn: Conn) -> None:
        await conn.request()

    async def stalls(conn: Conn) -> None:
        await conn.request()
        await conn.stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12")
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with server(garbage) as (url, _), client() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get(url)
        async with server(closes) as (url, _), client() as http:
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await http.get(url)
        async with server(stalls) as (url, _), client(timeout=0.3) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.get(url)
        async with client() as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{free_port()}/")
            with pytest.raises(httpx.UnsupportedProtocol):
                await http.get("https://127.0.0.1:1/")


async def test_a_kept_connection_the_server_closed_is_replaced() -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        # ... and closes, as an idle server does

    with anyio.fail_after(10):
        async with server(handler) as (url, accepted), client() as http:
            assert (await http.get(url)).content == b"ok"
            await anyio.sleep(0.1)
            assert (await http.get(url)).content == b"ok"
            assert len(accepted) == 2


async def test_a_body_left_early_closes_its_connection() -> None:
    data = data_of(4 * MiB)

    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                   % len(data) + data)

    with anyio.fail_after(10):
        async with server(handler) as (url, accepted), client() as http:
            async with http.stream("GET", url) as resp:
                await resp.aiter_raw().__anext__()
            assert (await http.get(url)).content == data
            assert len(accepted) == 2  # the half-read one was not reused


async def test_bytes_of_a_slow_sender_are_handed_on_without_waiting_for_a_full_buffer() -> None:
    got_first = anyio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * MiB))
        await conn.stream.send(b"a" * 5000)
        await anyio.sleep(0.05)
        await conn.stream.send(b"b" * 5000)
        await got_first.wait()  # the rest only once the client saw the first bytes
        await conn.stream.send(b"c" * (2 * MiB - 10_000))

    with anyio.fail_after(10):
        async with server(handler) as (url, _), client() as http:
            async with http.stream("GET", url) as resp:
                seen = 0
                async for chunk in resp.aiter_raw():
                    seen += len(chunk)
                    got_first.set()
                assert seen == 2 * MiB


async def test_max_connections_makes_requests_wait_for_a_free_one() -> None:
    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    transport = PlainHttpTransport(max_connections=1)
    with anyio.fail_after(10):
        async with server(handler) as (url, _), client(transport) as http:
            async with http.stream("GET", url):
                with pytest.raises(httpx.PoolTimeout):
                    await http.get(url, timeout=httpx.Timeout(5, pool=0.2))
            assert (await http.get(url)).content == b"ok"
