"""The QUIC peer transport (``pyrsia-transport-quic``) over real UDP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import socket
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from pyrsia_core.errors import PyrsiaError, TransportError, UsageError
from pyrsia_core.interfaces import BlobSource, PeerAddress, PeerBlob, RequestHandler
from pyrsia_core.testing.conformance import PeerTransportConformance, TransportPair
from pyrsia_transport_quic import QuicTransport, parse_address

from pyrsia_core import Digest, plugins

pytestmark = pytest.mark.anyio

KiB = 1024
MiB = 1024 * KiB


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
        return PeerBlob(len(data), offset, chunks_of(data, offset))

    return source


async def no_blobs(digest: Digest, offset: int) -> PeerBlob | None:
    return None


async def echo(frame: bytes) -> bytes:
    return b"re:" + frame


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def peer(
    handler: RequestHandler, blobs: BlobSource = no_blobs, **options: object
) -> AsyncIterator[PeerAddress]:
    """A node serving ``handler`` and ``blobs`` over QUIC on a free UDP port."""
    async with QuicTransport(host="127.0.0.1", port=0, **options) as server_side:  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            port = await tg.start(server_side.serve, handler, blobs)
            try:
                yield PeerAddress(f"quic://127.0.0.1:{port}", node_id="ab" * 32)
            finally:
                tg.cancel_scope.cancel()


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


@pytest.fixture
async def transport() -> AsyncIterator[QuicTransport]:
    async with QuicTransport(timeout=5) as transport:
        yield transport


# --------------------------------------------------------------------------- specifics


def test_plugin_factory() -> None:
    transport = plugins.create(
        "pyrsia.transport", "quic", {"host": "127.0.0.1", "port": "0", "timeout": "2.5"}
    )
    assert isinstance(transport, QuicTransport)
    assert (transport.host, transport.port, transport.timeout) == ("127.0.0.1", 0, 2.5)
    for bad in ({"timeout": "soon"}, {"port": "70000"}, {"window": "1"}, {"tls": "1"}):
        with pytest.raises(UsageError):
            plugins.create("pyrsia.transport", "quic", bad)


def test_addresses() -> None:
    assert parse_address("quic://127.0.0.1:7888") == ("127.0.0.1", 7888)
    assert parse_address("quic://[::1]:7888/") == ("::1", 7888)
    for bad in ("http://127.0.0.1:7888", "quic://127.0.0.1", "quic://h:1/p2p", "quic://:1", "x"):
        with pytest.raises(UsageError):
            parse_address(bad)


async def test_bad_arguments(transport: QuicTransport) -> None:
    with pytest.raises(UsageError):
        await transport.connect(PeerAddress("http://127.0.0.1:1"))
    client = await transport.connect(PeerAddress("quic://127.0.0.1:9"))
    with pytest.raises(UsageError):
        await client.request(b"x", timeout=0)
    with pytest.raises(UsageError):
        client.fetch_blob(Digest.of(b"x"), offset=-1)
    await client.aclose()
    with pytest.raises(PyrsiaError):
        await client.request(b"x", timeout=1)


async def test_unserved_port_fails_fast(transport: QuicTransport) -> None:
    # Nobody listens: the kernel's "port unreachable" ends the attempt at once.
    client = await transport.connect(PeerAddress(f"quic://127.0.0.1:{free_udp_port()}"))
    start = anyio.current_time()
    with pytest.raises(TransportError, match=r"could not connect|unreachable"):
        await client.request(b"hello", timeout=10)
    assert anyio.current_time() - start < 3


async def test_oversized_frames(transport: QuicTransport) -> None:
    async with peer(echo, max_frame_size=1000) as address:
        client = await transport.connect(address)
        with pytest.raises(TransportError, match="too large"):
            await client.request(b"x" * 5000, timeout=10)
        assert await client.request(b"ok", timeout=10) == b"re:ok"
    small = QuicTransport(max_frame_size=100)
    async with small, peer(echo) as address:
        client = await small.connect(address)
        with pytest.raises(TransportError, match="not sent"):
            await client.request(b"x" * 200, timeout=10)
        with pytest.raises(TransportError, match="over 100 bytes"):
            await client.request(b"x" * 99, timeout=10)  # the reply is 102 bytes


async def test_garbage_datagrams_do_not_hurt_the_server(transport: QuicTransport) -> None:
    async with peer(echo) as address:
        host, port = parse_address(address.url)
        junk = [b"", b"\x00", b"\xff" * 1200, b"\xc0" + b"\x00" * 1300, bytes(range(256)) * 6]
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as udp:
            for data in junk * 20:
                if data:
                    await udp.sendto(data, host, port)
        client = await transport.connect(address)
        assert await client.request(b"still there", timeout=10) == b"re:still there"


async def test_stalled_peer_times_out(transport: QuicTransport) -> None:
    data = blob_bytes(3 * MiB, seed=1)
    digest = Digest.of(data)
    release = anyio.Event()

    async def stalling(start: int) -> AsyncIterator[bytes]:
        yield data[start : start + 64 * KiB]
        await release.wait()  # then nothing: a peer that stalls
        yield data[start + 64 * KiB :]

    async def source(wanted: Digest, start: int) -> PeerBlob | None:
        return PeerBlob(len(data), start, stalling(start)) if wanted == digest else None

    with anyio.fail_after(20):
        async with peer(echo, source) as address:
            client = await transport.connect(address)
            start = anyio.current_time()
            with pytest.raises(TransportError, match="stalled"):
                await read_all(client.fetch_blob(digest, timeout=0.5))
            assert anyio.current_time() - start < 5
            release.set()
            assert await client.request(b"ok", timeout=10) == b"re:ok"
            # Resume with an offset, as the node does after a stall.
            assert await read_all(client.fetch_blob(digest, offset=1000)) == data[1000:]


@pytest.mark.parametrize("kind", ["short", "failing", "long"])
async def test_a_source_that_breaks_its_word(transport: QuicTransport, kind: str) -> None:
    data = blob_bytes(MiB, seed=2)
    digest = Digest.of(data)

    async def body() -> AsyncIterator[bytes]:
        yield data[: 300 * KiB]
        if kind == "failing":
            raise OSError("disk on fire")
        if kind == "long":
            yield data[300 * KiB :] + b"extra"
        # short: ends early

    async def source(wanted: Digest, start: int) -> PeerBlob | None:
        return PeerBlob(len(data), start, body())

    async with peer(echo, source) as address:
        client = await transport.connect(address)
        got = bytearray()
        with pytest.raises(TransportError):
            async for chunk in client.fetch_blob(digest, timeout=5):
                got += chunk
        assert len(got) <= len(data) and data.startswith(bytes(got))
        assert await client.request(b"ok", timeout=10) == b"re:ok"


async def test_large_blob_streams_with_flat_memory() -> None:
    size = 16 * MiB
    piece = blob_bytes(MiB, seed=3)
    digest = Digest.of(b"not checked here")

    async def body(start: int) -> AsyncIterator[bytes]:
        for _ in range(size // MiB):
            yield piece

    async def source(wanted: Digest, start: int) -> PeerBlob | None:
        return PeerBlob(size, 0, body(0))

    async with peer(echo, source) as address, QuicTransport(window=MiB) as transport:
        client = await transport.connect(address)
        tracemalloc.start()
        try:
            received = 0
            blob = await client.open_blob(digest)
            assert blob.size == size
            async for chunk in blob.body:
                received += len(chunk)
                await anyio.lowlevel.checkpoint()  # a consumer that lets the others run
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert received == size
        # Both sides stay within a few credit windows, not the blob's size.
        assert peak < 6 * MiB, peak


async def test_closing(transport: QuicTransport) -> None:
    async with peer(echo) as address:
        client = await transport.connect(address)
        assert await client.request(b"a", timeout=10) == b"re:a"
        await transport.aclose()
        await transport.aclose()
        with pytest.raises(PyrsiaError):
            await client.request(b"b", timeout=10)
        with pytest.raises(PyrsiaError):
            await transport.connect(address)


# --------------------------------------------------------------------------- conformance


class TestQuicTransportConformance(PeerTransportConformance):
    @pytest.fixture
    async def transport_pair(self) -> AsyncIterator[TransportPair]:
        @asynccontextmanager
        async def serve_peer(
            handler: RequestHandler, blobs: BlobSource
        ) -> AsyncIterator[PeerAddress]:
            async with peer(handler, blobs) as address:
                yield PeerAddress(address.url)

        async with QuicTransport(timeout=5) as transport:
            yield TransportPair(
                transport, serve_peer, PeerAddress(f"quic://127.0.0.1:{free_udp_port()}")
            )
