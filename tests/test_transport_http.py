"""The HTTP peer transport (``pyrsia-transport-http``) over real HTTP on 127.0.0.1.

The peer app runs in the node's own server (``pyrsia_registry._server``), mounted at
``/p2p`` by a small dispatcher, as the node mounts it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import socket
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from pyrsia_core.errors import PyrsiaError, TransportError, UsageError
from pyrsia_core.interfaces import BlobSource, PeerAddress, PeerBlob, RequestHandler
from pyrsia_core.testing.conformance import PeerTransportConformance, TransportPair
from pyrsia_registry._server import ASGIApp, Receive, Scope, Send, serve
from pyrsia_transport_http import MAX_FRAME_SIZE, PREFIX, HttpPeerClient, HttpTransport, PeerApp

from pyrsia_core import Digest, plugins

pytestmark = pytest.mark.anyio

KiB = 1024
MiB = 1024 * KiB


# --------------------------------------------------------------------------- helpers


def blob_bytes(size: int, seed: int = 0) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


async def chunks_of(data: bytes, start: int = 0, size: int = 64 * KiB) -> AsyncIterator[bytes]:
    for pos in range(start, len(data), size):
        yield data[pos : pos + size]


def bytes_source(blobs: dict[Digest, bytes]) -> BlobSource:
    async def source(digest: Digest, offset: int) -> PeerBlob | None:
        data = blobs.get(digest)
        if data is None:
            return None
        return PeerBlob(len(data), offset, chunks_of(data, offset))  # the app checks offset

    return source


async def no_blobs(digest: Digest, offset: int) -> PeerBlob | None:
    return None


async def echo(frame: bytes) -> bytes:
    return b"re:" + frame


def mount(p2p: ASGIApp, *, strip: bool = False) -> ASGIApp:
    """The node's dispatcher: ``/p2p/...`` goes to ``p2p`` with ``root_path="/p2p"``.

    ``strip`` passes the path below the mount point (the older ASGI mount style) instead
    of the full path.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX + "/"):
            path = scope["path"][len(PREFIX) :] if strip else scope["path"]
            await p2p({**scope, "root_path": PREFIX, "path": path}, receive, send)
            return
        if scope["type"] == "http":
            body = b"the node's own API\n"
            headers = [(b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    return app


@asynccontextmanager
async def running(app: ASGIApp, **options: Any) -> AsyncIterator[int]:
    """Serve ``app`` on a free port of 127.0.0.1 for the block; yields the port."""
    options.setdefault("shutdown_timeout", 1.0)
    options.setdefault("lifespan", "off")
    async with anyio.create_task_group() as tg:
        port = await tg.start(functools.partial(serve, app, "127.0.0.1", 0, **options))
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def peer(
    handler: RequestHandler,
    blobs: BlobSource = no_blobs,
    *,
    max_frame_size: int | None = None,
) -> AsyncIterator[PeerAddress]:
    """A node serving ``handler`` and ``blobs`` through the http transport's app."""
    server_side = (
        HttpTransport() if max_frame_size is None else HttpTransport(max_frame_size=max_frame_size)
    )
    async with server_side:
        async with running(mount(server_side.asgi_app(handler, blobs))) as port:
            yield PeerAddress(f"http://127.0.0.1:{port}", node_id="ab" * 32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def close_iterator(chunks: AsyncIterator[bytes]) -> None:
    await chunks.aclose()  # type: ignore[attr-defined]  # the ABCs promise AsyncIterator only


@pytest.fixture
async def transport() -> AsyncIterator[HttpTransport]:
    async with HttpTransport(timeout=5) as transport:
        yield transport


# --------------------------------------------------------------------------- frames


async def test_rpc_round_trip(transport: HttpTransport) -> None:
    big_request = blob_bytes(MiB, seed=1)
    big_reply = blob_bytes(MiB, seed=2)
    seen: list[bytes] = []

    async def handler(frame: bytes) -> bytes:
        seen.append(frame)
        if frame == big_request:
            return big_reply
        return b"" if frame == b"" else b"re:" + frame

    with anyio.fail_after(10):
        async with peer(handler) as address:
            async with await transport.connect(address) as client:
                assert isinstance(client, HttpPeerClient)
                assert await client.request(b"", timeout=5) == b""
                assert await client.request(b"hi", timeout=5) == b"re:hi"
                assert await client.request(big_request, timeout=5) == big_reply
    assert seen == [b"", b"hi", big_request]


async def test_fifty_concurrent_requests(transport: HttpTransport) -> None:
    async def handler(frame: bytes) -> bytes:
        await anyio.sleep(0.01 * (int(frame) % 4))  # replies come back out of order
        return b"re:" + frame

    replies: dict[bytes, bytes] = {}
    with anyio.fail_after(10):
        async with peer(handler) as address:
            client = await transport.connect(address)

            async def one(frame: bytes) -> None:
                replies[frame] = await client.request(frame, timeout=5)

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, b"%d" % i)
            await client.aclose()
    assert replies == {b"%d" % i: b"re:%d" % i for i in range(50)}


async def test_handler_exception_is_transport_error(
    transport: HttpTransport, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(frame: bytes) -> bytes:
        if frame == b"fail":
            raise RuntimeError("secret internal detail")
        return b"re:" + frame

    with anyio.fail_after(10):
        async with peer(handler) as address:
            async with await transport.connect(address) as client:
                with caplog.at_level(logging.ERROR, logger="pyrsia.transport.http"):
                    with pytest.raises(TransportError) as info:
                        await client.request(b"fail", timeout=5)
                message = str(info.value)
                assert "500" in message and address.url in message
                assert "secret" not in message  # no traceback or detail reaches the peer
                assert await client.request(b"ok", timeout=5) == b"re:ok"
    records = [r for r in caplog.records if r.name == "pyrsia.transport.http"]
    assert records and records[0].exc_info is not None


async def test_oversized_request_is_413(transport: HttpTransport) -> None:
    with anyio.fail_after(10):
        async with peer(echo, max_frame_size=MiB) as address:
            async with await transport.connect(address) as client:
                assert await client.request(b"x" * MiB, timeout=5) == b"re:" + b"x" * MiB
                with pytest.raises(TransportError, match="413"):
                    await client.request(b"x" * (MiB + 1), timeout=5)
                # Far over the peer's limit the peer may cut the upload short (and the 413
                # with it): still a TransportError.
                with pytest.raises(TransportError):
                    await client.request(b"x" * (8 * MiB), timeout=5)
                assert await client.request(b"still fine", timeout=5) == b"re:still fine"
                # Over the protocol's own limit a frame is not even sent.
                start = anyio.current_time()
                with pytest.raises(TransportError, match="limit"):
                    await client.request(b"x" * (MAX_FRAME_SIZE + 1), timeout=5)
                assert anyio.current_time() - start < 1


async def test_oversized_chunked_request_is_413() -> None:
    """A body without Content-Length is counted as it arrives."""

    async def parts() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * (MiB // 2)

    with anyio.fail_after(10):
        async with peer(echo, max_frame_size=MiB) as address:
            async with httpx.AsyncClient(trust_env=False) as http:
                response = await http.post(f"{address.url}/p2p/rpc", content=parts())
                assert response.status_code == 413


async def test_oversized_reply_is_transport_error() -> None:
    async def handler(frame: bytes) -> bytes:
        return b"z" * (2 * MiB)

    with anyio.fail_after(10):
        async with peer(handler) as address:
            async with HttpTransport(max_frame_size=MiB) as small:
                async with await small.connect(address) as client:
                    with pytest.raises(TransportError, match="over"):
                        await client.request(b"give me a lot", timeout=5)


async def test_unreachable_address_fails_quickly(transport: HttpTransport) -> None:
    address = PeerAddress(f"http://127.0.0.1:{free_port()}")
    start = anyio.current_time()
    with anyio.fail_after(5):
        async with await transport.connect(address) as client:
            with pytest.raises(TransportError, match=r"could not connect.*127\.0\.0\.1"):
                await client.request(b"hello", timeout=5)
            with pytest.raises(TransportError):
                await client.open_blob(Digest.of(b"x"), timeout=5)
            with pytest.raises(TransportError):
                await read_all(client.fetch_blob(Digest.of(b"x"), timeout=5))
    assert anyio.current_time() - start < 2


async def test_request_timeout(transport: HttpTransport) -> None:
    release = anyio.Event()

    async def handler(frame: bytes) -> bytes:
        if frame == b"hang":
            await release.wait()
        return b"re:" + frame

    with anyio.fail_after(10):
        async with peer(handler) as address:
            async with await transport.connect(address) as client:
                start = anyio.current_time()
                with pytest.raises(TransportError, match=r"within 0\.3 s"):
                    await client.request(b"hang", timeout=0.3)
                assert anyio.current_time() - start < 2
                release.set()
                assert await client.request(b"ok", timeout=5) == b"re:ok"


async def test_a_reply_that_trickles_is_bounded_by_the_timeout(transport: HttpTransport) -> None:
    """``timeout`` bounds the whole exchange, not each read."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"100")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(100):
            await send({"type": "http.response.body", "body": b".", "more_body": True})
            await anyio.sleep(0.05)
        await send({"type": "http.response.body", "body": b""})

    with anyio.fail_after(10):
        async with running(app) as port:
            async with await transport.connect(PeerAddress(f"http://127.0.0.1:{port}")) as client:
                start = anyio.current_time()
                with pytest.raises(TransportError):
                    await client.request(b"x", timeout=0.5)
                assert anyio.current_time() - start < 2


# --------------------------------------------------------------------------- blobs


async def test_fetch_blob_whole_and_from_offsets(transport: HttpTransport) -> None:
    data = blob_bytes(3 * MiB + 123, seed=3)
    digest = Digest.of(data)
    with anyio.fail_after(10):
        async with peer(echo, bytes_source({digest: data})) as address:
            async with await transport.connect(address) as client:
                sizes = [len(chunk) async for chunk in client.fetch_blob(digest)]
                assert sum(sizes) == len(data)
                assert all(256 * KiB <= size <= MiB for size in sizes[:-1])
                assert await read_all(client.fetch_blob(digest)) == data
                for offset in (0, 1, 65_536, 2 * MiB + 7, len(data) - 1, len(data)):
                    blob = await client.open_blob(digest, offset=offset, timeout=5)
                    assert (blob.size, blob.offset) == (len(data), offset)
                    assert await read_all(blob.body) == data[offset:]
                    got = await read_all(client.fetch_blob(digest, offset=offset))
                    assert got == data[offset:]
                with pytest.raises(TransportError, match="beyond"):
                    await client.open_blob(digest, offset=len(data) + 1)
                # One part: only that range travels (the body ends there).
                for offset, length in ((0, MiB), (MiB, MiB), (3 * MiB, 200), (5, 1)):
                    blob = await client.open_blob(digest, offset=offset, length=length)
                    assert (blob.size, blob.offset) == (len(data), offset)
                    assert await read_all(blob.body) == data[offset : offset + length]
                with pytest.raises(UsageError):
                    await client.open_blob(digest, length=0)


async def test_empty_blob(transport: HttpTransport) -> None:
    digest = Digest.of(b"")
    with anyio.fail_after(10):
        async with peer(echo, bytes_source({digest: b""})) as address:
            async with await transport.connect(address) as client:
                blob = await client.open_blob(digest)
                assert blob.size == 0
                assert await read_all(blob.body) == b""
                assert await read_all(client.fetch_blob(digest)) == b""


async def test_unknown_blob_is_transport_error(transport: HttpTransport) -> None:
    unknown = Digest.of(b"never stored")
    with anyio.fail_after(10):
        async with peer(echo) as address:
            async with await transport.connect(address) as client:
                with pytest.raises(TransportError, match="does not have") as info:
                    await client.open_blob(unknown)
                assert str(unknown) in str(info.value) and address.url in str(info.value)
                with pytest.raises(TransportError, match="does not have"):
                    await read_all(client.fetch_blob(unknown, offset=10))
                assert await client.request(b"ok", timeout=5) == b"re:ok"


async def test_large_blob_streams_with_flat_memory(transport: HttpTransport) -> None:
    size = 64 * MiB
    block = blob_bytes(MiB, seed=4)
    digest = Digest.of(b"a 64 MiB blob, never hashed")  # peer bytes are not verified here

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // MiB):
            for pos in range(0, MiB, 256 * KiB):
                yield block[pos : pos + 256 * KiB]

    async def source(wanted: Digest, offset: int) -> PeerBlob | None:
        return PeerBlob(size, 0, body()) if wanted == digest and offset == 0 else None

    expected = hashlib.sha256(block * 64).hexdigest()
    with anyio.fail_after(20):
        async with peer(echo, source) as address:
            async with await transport.connect(address) as client:
                tracemalloc.start()
                try:
                    tracemalloc.reset_peak()
                    blob = await client.open_blob(digest)
                    assert blob.size == size
                    hasher = hashlib.sha256()
                    total = 0
                    async for chunk in blob.body:
                        hasher.update(chunk)
                        total += len(chunk)
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
    assert total == size
    assert hasher.hexdigest() == expected
    assert peak < 8 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"


async def test_stalled_peer_times_out_and_the_server_stops_reading(
    transport: HttpTransport,
) -> None:
    digest = Digest.of(b"stalls")
    body_closed = anyio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"a" * 1000
            await anyio.sleep_forever()
            yield b"never"
        finally:
            body_closed.set()

    async def source(wanted: Digest, offset: int) -> PeerBlob | None:
        return PeerBlob(10_000, offset, body())

    with anyio.fail_after(10):
        async with peer(echo, source) as address:
            async with await transport.connect(address) as client:
                start = anyio.current_time()
                blob = await client.open_blob(digest, timeout=0.5)
                with pytest.raises(TransportError, match="stalled"):
                    await read_all(blob.body)
                assert anyio.current_time() - start < 2
                with pytest.raises(TransportError, match="stalled"):
                    await read_all(client.fetch_blob(digest, timeout=0.5))
                # The server noticed the client leave and closed the source's body.
                with anyio.fail_after(3):
                    await body_closed.wait()
                assert await client.request(b"ok", timeout=5) == b"re:ok"


async def test_source_shorter_than_announced_is_transport_error(
    transport: HttpTransport,
) -> None:
    digest = Digest.of(b"short")

    async def source(wanted: Digest, offset: int) -> PeerBlob | None:
        return PeerBlob(1000, 0, chunks_of(b"s" * 500))

    got = bytearray()
    with anyio.fail_after(10):
        async with peer(echo, source) as address:
            async with await transport.connect(address) as client:
                with pytest.raises(TransportError):
                    async for chunk in client.fetch_blob(digest):
                        got += chunk
                assert await client.request(b"ok", timeout=5) == b"re:ok"
    assert len(got) <= 500


async def test_source_failing_mid_stream_is_transport_error(transport: HttpTransport) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"f" * 300_000
        raise OSError("disk read error")

    async def source(wanted: Digest, offset: int) -> PeerBlob | None:
        return PeerBlob(1_000_000, 0, body())

    got = bytearray()
    with anyio.fail_after(10):
        async with peer(echo, source) as address:
            async with await transport.connect(address) as client:
                with pytest.raises(TransportError):
                    async for chunk in client.fetch_blob(Digest.of(b"f")):
                        got += chunk
                assert await client.request(b"ok", timeout=5) == b"re:ok"
    assert len(got) <= 300_000


async def test_source_longer_than_announced_never_yields_more(
    transport: HttpTransport,
) -> None:
    digest = Digest.of(b"long")

    async def source(wanted: Digest, offset: int) -> PeerBlob | None:
        return PeerBlob(1000, 0, chunks_of(b"l" * 5000, size=300))

    got = bytearray()
    with anyio.fail_after(10):
        async with peer(echo, source) as address:
            async with await transport.connect(address) as client:
                with pytest.raises(TransportError):
                    async for chunk in client.fetch_blob(digest):
                        got += chunk
    assert len(got) <= 1000


@asynccontextmanager
async def raw_peer(response: bytes, *, then_close: bool = True) -> AsyncIterator[PeerAddress]:
    """A misbehaving peer: answers every request with exactly ``response`` bytes."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive()
            await stream.send(response)
            if not then_close:
                await anyio.sleep_forever()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            try:
                yield PeerAddress(f"http://127.0.0.1:{port}")
            finally:
                tg.cancel_scope.cancel()


async def test_short_body_from_a_raw_peer(transport: HttpTransport) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    with anyio.fail_after(10):
        async with raw_peer(head + b"x" * 500) as address:
            async with await transport.connect(address) as client:
                blob = await client.open_blob(Digest.of(b"x"), timeout=5)
                assert blob.size == 1000
                with pytest.raises(TransportError):
                    await read_all(blob.body)


async def test_long_chunked_body_from_a_raw_peer(transport: HttpTransport) -> None:
    payload = b"q" * 20
    head = (
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-14/15\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    got = bytearray()
    with anyio.fail_after(10):
        async with raw_peer(head + body) as address:
            async with await transport.connect(address) as client:
                blob = await client.open_blob(Digest.of(b"x"), offset=5, timeout=5)
                assert blob.size == 15
                with pytest.raises(TransportError, match="more bytes"):
                    async for chunk in blob.body:
                        got += chunk
    assert len(got) <= 10


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10\r\nContent-Length: 10\r\n",
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-9/11\r\nContent-Length: 5\r\n",
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: nonsense\r\nContent-Length: 5\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: http://example.com/\r\nContent-Length: 0\r\n",
        b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n",
    ],
)
async def test_unusable_range_answers(transport: HttpTransport, head: bytes) -> None:
    with anyio.fail_after(10):
        async with raw_peer(head + b"\r\n" + b"r" * 10) as address:
            async with await transport.connect(address) as client:
                with pytest.raises(TransportError, match=r"127\.0\.0\.1"):
                    await client.open_blob(Digest.of(b"x"), offset=5, timeout=5)


async def test_garbage_from_a_raw_peer(transport: HttpTransport) -> None:
    with anyio.fail_after(10):
        async with raw_peer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as address:
            async with await transport.connect(address) as client:
                with pytest.raises(TransportError):
                    await client.request(b"x", timeout=5)
                with pytest.raises(TransportError):
                    await client.open_blob(Digest.of(b"x"), timeout=5)


async def test_zero_copy_path_serves_identical_bytes(
    transport: HttpTransport, tmp_path: Path
) -> None:
    data = blob_bytes(2 * MiB + 5, seed=5)
    digest = Digest.of(data)
    path = tmp_path / "blob"
    path.write_bytes(data)

    async def unused() -> AsyncIterator[bytes]:
        raise AssertionError("the body must not be read when the file can be sent")
        yield b""  # pragma: no cover

    async def source(wanted: Digest, offset: int) -> PeerBlob | None:
        return PeerBlob(len(data), offset, unused(), str(path))

    with anyio.fail_after(10):
        async with peer(echo, source) as address:
            async with await transport.connect(address) as client:
                assert await read_all(client.fetch_blob(digest)) == data
                for offset in (1, MiB, len(data) - 1, len(data)):
                    blob = await client.open_blob(digest, offset=offset)
                    assert blob.size == len(data)
                    assert await read_all(blob.body) == data[offset:]


async def test_no_sendfile_extension_streams_the_body(
    transport: HttpTransport, tmp_path: Path
) -> None:
    """A server without ``pyrsia.sendfile`` gets the body, even when a path is set."""
    data = blob_bytes(700_000, seed=6)
    digest = Digest.of(data)

    async def source(wanted: Digest, offset: int) -> PeerBlob | None:
        return PeerBlob(len(data), offset, chunks_of(data, offset), str(tmp_path / "absent"))

    p2p = transport.asgi_app(echo, source)

    async def without_extensions(scope: Scope, receive: Receive, send: Send) -> None:
        await p2p({**scope, "extensions": {}}, receive, send)

    with anyio.fail_after(10):
        async with running(mount(without_extensions)) as port:
            async with await transport.connect(PeerAddress(f"http://127.0.0.1:{port}")) as client:
                assert await read_all(client.fetch_blob(digest, offset=3)) == data[3:]


async def test_abandoned_bodies_release_connections() -> None:
    data = blob_bytes(4 * MiB, seed=7)
    digest = Digest.of(data)
    with anyio.fail_after(15):
        async with peer(echo, bytes_source({digest: data})) as address:
            async with HttpTransport(max_connections=2) as small:
                async with await small.connect(address) as client:
                    for n in range(20):
                        blob = await client.open_blob(digest, timeout=5)
                        if n % 2:
                            first = await blob.body.__anext__()
                            assert data.startswith(first)
                        await close_iterator(blob.body)
                        chunks = client.fetch_blob(digest, timeout=5)
                        await chunks.__anext__()
                        await close_iterator(chunks)
                    assert await client.request(b"ok", timeout=5) == b"re:ok"
                    assert await read_all(client.fetch_blob(digest)) == data


# --------------------------------------------------------------------------- the app


@pytest.mark.parametrize("style", ["mounted", "mounted-stripped", "unmounted"])
async def test_app_routes(style: str) -> None:
    data = b"some blob bytes"
    digest = Digest.of(data)
    p2p = PeerApp(echo, bytes_source({digest: data}))
    app: ASGIApp = p2p if style == "unmounted" else mount(p2p, strip=style == "mounted-stripped")
    with anyio.fail_after(10):
        async with running(app) as port:
            base = f"http://127.0.0.1:{port}/p2p"
            async with httpx.AsyncClient(trust_env=False) as http:
                response = await http.post(f"{base}/rpc", content=b"hi")
                assert (response.status_code, response.content) == (200, b"re:hi")
                assert response.headers["content-type"] == "application/octet-stream"

                response = await http.get(f"{base}/blobs/{digest}")
                assert (response.status_code, response.content) == (200, data)
                assert response.headers["content-length"] == str(len(data))

                response = await http.get(f"{base}/blobs/{digest}", headers={"range": "bytes=5-"})
                assert (response.status_code, response.content) == (206, data[5:])
                assert response.headers["content-range"] == f"bytes 5-{len(data) - 1}/{len(data)}"

                response = await http.head(f"{base}/blobs/{digest}")
                assert response.status_code == 200 and response.content == b""
                assert response.headers["content-length"] == str(len(data))

                # A closed range (one part of a blob), clipped to the blob's end.
                response = await http.get(f"{base}/blobs/{digest}", headers={"range": "bytes=0-3"})
                assert (response.status_code, response.content) == (206, data[:4])
                assert response.headers["content-range"] == f"bytes 0-3/{len(data)}"
                response = await http.get(f"{base}/blobs/{digest}", headers={"range": "bytes=5-7"})
                assert (response.status_code, response.content) == (206, data[5:8])
                response = await http.get(f"{base}/blobs/{digest}",
                                          headers={"range": "bytes=5-999"})
                assert (response.status_code, response.content) == (206, data[5:])
                response = await http.get(f"{base}/blobs/{digest}", headers={"range": "bytes=7-5"})
                assert response.status_code == 416
                # Other Range forms are ignored: the whole blob.
                response = await http.get(f"{base}/blobs/{digest}",
                                          headers={"range": "bytes=-3"})
                assert (response.status_code, response.content) == (200, data)

                response = await http.get(f"{base}/blobs/{digest}", headers={"range": "bytes=99-"})
                assert response.status_code == 416
                assert response.headers["content-range"] == f"bytes */{len(data)}"

                response = await http.get(f"{base}/blobs/{Digest.of(b'other')}")
                assert response.status_code == 404
                response = await http.get(f"{base}/blobs/sha256:nothex")
                assert response.status_code == 400
                response = await http.get(f"{base}/rpc")
                assert (response.status_code, response.headers["allow"]) == (405, "POST")
                response = await http.post(f"{base}/blobs/{digest}")
                assert (response.status_code, response.headers["allow"]) == (405, "GET, HEAD")
                response = await http.get(f"{base}/elsewhere")
                assert response.status_code == 404


async def test_blob_source_failure_is_a_clean_500(
    transport: HttpTransport, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_source(digest: Digest, offset: int) -> PeerBlob | None:
        raise OSError("disk on fire")

    async def failing_body() -> AsyncIterator[bytes]:
        raise OSError("read error")
        yield b""  # pragma: no cover

    async def broken_body(digest: Digest, offset: int) -> PeerBlob | None:
        return PeerBlob(10, offset, failing_body())

    with anyio.fail_after(10), caplog.at_level(logging.ERROR, "pyrsia.transport.http"):
        for source in (broken_source, broken_body):
            async with peer(echo, source) as address:
                async with await transport.connect(address) as client:
                    with pytest.raises(TransportError, match="500") as info:
                        await client.open_blob(Digest.of(b"x"))
                    assert "fire" not in str(info.value) and "read error" not in str(info.value)


# --------------------------------------------------------------------------- lifecycle, config


async def test_closing(transport: HttpTransport) -> None:
    with anyio.fail_after(10):
        async with peer(echo) as address:
            client = await transport.connect(address)
            other = await transport.connect(address)
            assert await client.request(b"a", timeout=5) == b"re:a"
            await client.aclose()
            await client.aclose()
            with pytest.raises(PyrsiaError):
                await client.request(b"b", timeout=5)
            with pytest.raises(PyrsiaError):
                client.fetch_blob(Digest.of(b"x"))
            assert await other.request(b"c", timeout=5) == b"re:c"  # the pool is the transport's
            await transport.aclose()
            await transport.aclose()
            assert transport.closed
            with pytest.raises(PyrsiaError):
                await other.request(b"d", timeout=5)
            with pytest.raises(PyrsiaError):
                await transport.connect(address)


async def test_bad_arguments(transport: HttpTransport) -> None:
    for url in ("127.0.0.1:7888", "ftp://host/", "http://", "http://h:1/?q=1"):
        with pytest.raises(UsageError):
            await transport.connect(PeerAddress(url))
    client = await transport.connect(PeerAddress("http://127.0.0.1:9/"))
    with pytest.raises(UsageError):
        await client.request(b"x", timeout=0)
    with pytest.raises(UsageError):
        client.fetch_blob(Digest.of(b"x"), offset=-1)
    with pytest.raises(UsageError):
        await client.open_blob("sha256:00", timeout=1)  # type: ignore[arg-type]


def test_plugin_factory() -> None:
    assert "http" in plugins.available("pyrsia.transport")
    transport = plugins.create("pyrsia.transport", "http", {})
    assert isinstance(transport, HttpTransport) and transport.name == "http"
    transport = plugins.create(
        "pyrsia.transport", "http", {"timeout": "2.5", "max_connections": "7"}
    )
    assert (transport.timeout, transport.max_connections) == (2.5, 7)
    for bad in ({"timeout": "soon"}, {"timeout": "-1"}, {"max_connections": "0"}, {"tls": "1"}):
        with pytest.raises(UsageError):
            plugins.create("pyrsia.transport", "http", bad)


# --------------------------------------------------------------------------- conformance


class TestHttpTransportConformance(PeerTransportConformance):
    @pytest.fixture
    async def transport_pair(self) -> AsyncIterator[TransportPair]:
        @asynccontextmanager
        async def serve_peer(
            handler: RequestHandler, blobs: BlobSource
        ) -> AsyncIterator[PeerAddress]:
            async with HttpTransport() as server_side:
                async with running(mount(server_side.asgi_app(handler, blobs))) as port:
                    yield PeerAddress(f"http://127.0.0.1:{port}")

        async with HttpTransport(timeout=5) as transport:
            yield TransportPair(
                transport, serve_peer, PeerAddress(f"http://127.0.0.1:{free_port()}")
            )
