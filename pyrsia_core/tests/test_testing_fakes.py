"""The network, upstream and package-type fakes of ``pyrsia_core.testing``.

Each runs its conformance suite, then the fakes' own extras (fault injection,
call recording) are tested directly.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Sequence

import attrs
import pytest
from pyrsia_core.errors import PyrsiaError, StoreClosed, TransportError, UsageError
from pyrsia_core.interfaces import PeerAddress, PeerBlob
from pyrsia_core.testing import (
    Delivery,
    MemoryBlobStore,
    MemoryNetwork,
    MemoryPackageType,
    MemoryTransport,
    MemoryUpstream,
    PackageIdError,
    PeerFaults,
    UpstreamCall,
    UpstreamNotFoundError,
    store_blob_source,
)
from pyrsia_core.testing.conformance import (
    PackageTypeConformance,
    PeerTransportConformance,
    TransportPair,
    UpstreamConformance,
)

from pyrsia_core import Digest

# --------------------------------------------------------------------------- conformance


class TestMemoryTransport(PeerTransportConformance):
    enforces_timeouts = False  # delivery is a direct await: nothing can time out

    @pytest.fixture
    async def transport_pair(self) -> AsyncIterator[TransportPair]:
        network = MemoryNetwork()
        async with network.transport("memory://me") as transport:
            yield TransportPair(transport, network.serving, PeerAddress("memory://nobody"))


_UPSTREAM_CONTENT = {
    "pkg/manifests/1.0": ("application/json", b'{"refs":[]}'),
    "pkg/blobs/big": ("application/octet-stream", bytes(range(256)) * 1000),
    "pkg/blobs/empty": ("application/octet-stream", b""),
}


class TestMemoryUpstream(UpstreamConformance):
    @pytest.fixture
    async def upstream(self) -> AsyncIterator[MemoryUpstream]:
        async with MemoryUpstream(_UPSTREAM_CONTENT, chunk_size=10_000) as upstream:
            yield upstream

    @pytest.fixture
    def known(self) -> list[tuple[str, bytes]]:
        return [(locator, data) for locator, (_, data) in _UPSTREAM_CONTENT.items()]

    @pytest.fixture
    def missing(self) -> str:
        return "pkg/blobs/nothing"


_D1, _D2, _D3 = (Digest.of(b"%d" % n) for n in range(3))


class TestMemoryPackageType(PackageTypeConformance):
    @pytest.fixture
    def package_type(self) -> MemoryPackageType:
        return MemoryPackageType()

    @pytest.fixture
    def valid_ids(self) -> list[str]:
        return ["alpine:3.16.2", "a:1", "my-lib.core_x:1.0.0-rc.1+build.5"]

    @pytest.fixture
    def invalid_ids(self) -> list[str]:
        return ["", "alpine", ":1", "alpine:", "Alpine:1", "a b:1", "a:1 ", "a:-1", "x" * 300]

    @pytest.fixture
    def samples(self) -> list[tuple[bytes, str, Sequence[Digest | str]]]:
        return [
            (
                MemoryPackageType.manifest([_D1, _D2, _D3]),
                MemoryPackageType.MEDIA_TYPE,
                [_D1, _D2, _D3],
            ),
            (MemoryPackageType.manifest([]), MemoryPackageType.MEDIA_TYPE, []),
            (b'{"refs": ["%s"]}' % str(_D2).encode(), "application/json", [str(_D2)]),
        ]


# --------------------------------------------------------------------------- network extras


async def _echo(frame: bytes) -> bytes:
    return b"re:" + frame


async def _read(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


@pytest.fixture
async def store() -> MemoryBlobStore:
    store = MemoryBlobStore()
    await store.put_bytes(bytes(range(256)) * 100)
    return store


DATA = bytes(range(256)) * 100
DIGEST = Digest.of(DATA)


@pytest.mark.anyio
async def test_down_and_back(store: MemoryBlobStore) -> None:
    network = MemoryNetwork()
    a = network.serve("memory://a", _echo, store)
    transport = network.transport("memory://me")
    client = await transport.connect(a)
    network.faults(a).down = True
    with pytest.raises(TransportError, match="down"):
        await client.request(b"x", timeout=1)
    with pytest.raises(TransportError):
        await _read(client.fetch_blob(DIGEST))
    with pytest.raises(TransportError):
        await transport.connect(a)
    network.faults("memory://a").down = False
    assert await client.request(b"x", timeout=1) == b"re:x"
    assert await _read(client.fetch_blob(DIGEST)) == DATA


@pytest.mark.anyio
async def test_fail_next_and_deliveries(store: MemoryBlobStore) -> None:
    network = MemoryNetwork()
    a = network.serve(PeerAddress("memory://a"), _echo, store)
    client = await network.transport("memory://me").connect(a)
    network.faults(a).fail_next = 2
    for _ in range(2):
        with pytest.raises(TransportError, match="injected"):
            await client.request(b"x", timeout=1)
    assert await client.request(b"y", timeout=1) == b"re:y"
    await _read(client.fetch_blob(DIGEST, offset=3))
    assert network.deliveries == [
        Delivery("request", "memory://me", "memory://a", frame=b"x"),
        Delivery("request", "memory://me", "memory://a", frame=b"x"),
        Delivery("request", "memory://me", "memory://a", frame=b"y"),
        Delivery("fetch_blob", "memory://me", "memory://a", digest=DIGEST, offset=3),
    ]


@pytest.mark.anyio
async def test_drop_rate_is_seeded() -> None:
    async def run(seed: int) -> list[bool]:
        network = MemoryNetwork(seed=seed)
        a = network.serve("memory://a", _echo)
        network.faults(a).drop_rate = 0.5
        client = await network.transport().connect(a)
        outcomes = []
        for _ in range(200):
            try:
                await client.request(b"x", timeout=1)
                outcomes.append(True)
            except TransportError:
                outcomes.append(False)
        return outcomes

    first = await run(7)
    assert first == await run(7)
    assert first != await run(8)
    assert 60 < sum(first) < 140


@pytest.mark.anyio
async def test_partition_and_heal() -> None:
    network = MemoryNetwork()
    for name in "abc":
        network.serve(f"memory://{name}", _echo)
    ta, tb, tc = (network.transport(f"memory://{n}") for n in "abc")
    outsider = network.transport()
    network.partition(["memory://a", "memory://b"], ["memory://c"])
    assert await (await ta.connect(PeerAddress("memory://b"))).request(b"1", timeout=1) == b"re:1"
    with pytest.raises(TransportError, match="partition"):
        await ta.connect(PeerAddress("memory://c"))
    client = await tc.connect(PeerAddress("memory://c"))  # itself
    assert await client.request(b"2", timeout=1) == b"re:2"
    assert await outsider.connect(PeerAddress("memory://c"))  # not in any group
    cb = await network.transport("memory://d").connect(PeerAddress("memory://b"))
    assert await cb.request(b"3", timeout=1) == b"re:3"
    ab = await ta.connect(PeerAddress("memory://b"))
    network.partition(["memory://a"], ["memory://b", "memory://c"])
    with pytest.raises(TransportError):  # existing clients are cut off too
        await ab.request(b"4", timeout=1)
    network.heal()
    assert await ab.request(b"5", timeout=1) == b"re:5"
    assert await (await tb.connect(PeerAddress("memory://c"))).request(b"6", timeout=1) == b"re:6"


@pytest.mark.anyio
async def test_reset_faults() -> None:
    network = MemoryNetwork()
    a = network.serve("memory://a", _echo)
    faults = network.faults(a)
    faults.down = True
    faults.corrupt_at = faults.truncate_after = faults.fail_after = 1
    faults.fail_next, faults.drop_rate = 3, 1.0
    network.partition(["memory://a"], ["memory://b"])
    network.reset_faults()
    assert attrs.asdict(faults) == attrs.asdict(PeerFaults())
    client = await network.transport("memory://b").connect(a)
    assert await client.request(b"x", timeout=1) == b"re:x"


@pytest.mark.anyio
@pytest.mark.parametrize("offset", [0, 100, 1000, 1001, 20_000])
async def test_corrupt_at_is_a_blob_offset(store: MemoryBlobStore, offset: int) -> None:
    network = MemoryNetwork()
    a = network.serve("memory://a", _echo, store)
    network.faults(a).corrupt_at = 1000
    client = await network.transport().connect(a)
    got = await _read(client.fetch_blob(DIGEST, offset=offset))
    expected = bytearray(DATA[offset:])
    if offset <= 1000:
        expected[1000 - offset] ^= 0xFF
    assert got == bytes(expected)
    assert len(got) == len(DATA) - offset


@pytest.mark.anyio
async def test_truncate_and_fail_after() -> None:
    store = MemoryBlobStore()
    big = bytes(range(256)) * 8192  # 2 MiB: two chunks of the store
    info = await store.put_bytes(big)
    network = MemoryNetwork()
    a = network.serve("memory://a", _echo, store)
    client = await network.transport().connect(a)
    faults = network.faults(a)
    for n in (0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 5):
        faults.truncate_after = n
        assert await _read(client.fetch_blob(info.digest)) == big[:n]
        assert await _read(client.fetch_blob(info.digest, offset=10)) == big[10 : 10 + n]
    faults.truncate_after = None
    for n in (0, 7, 1 << 20, (1 << 20) + 5):
        faults.fail_after = n
        got = bytearray()
        with pytest.raises(TransportError, match="broke"):
            async for chunk in client.fetch_blob(info.digest):
                got += chunk
        assert bytes(got) == big[:n]
    faults.fail_after = len(big)  # never passed: the stream completes
    assert await _read(client.fetch_blob(info.digest)) == big


class _Body:
    """A blob body that records whether it was closed (started or not)."""

    def __init__(self, data: bytes, fail: bool = False) -> None:
        self.data = data
        self.fail = fail
        self.closed = False
        self.served = False

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if self.served:
            if self.fail:
                raise OSError("disk gone")
            raise StopAsyncIteration
        self.served = True
        return self.data

    async def aclose(self) -> None:
        self.closed = True

    def state(self) -> tuple[bool, bool]:
        """``(served, closed)``, read through a call so that mypy does not narrow it."""
        return self.served, self.closed


@pytest.mark.anyio
async def test_blob_source_outcomes() -> None:
    network = MemoryNetwork()
    bodies: list[_Body] = []

    async def source(digest: Digest, offset: int) -> PeerBlob | None:
        if digest == Digest.of(b"none"):
            return None
        if digest == Digest.of(b"raise"):
            raise OSError("no disk")
        body = _Body(b"part", fail=digest == Digest.of(b"broken"))
        bodies.append(body)
        return PeerBlob(100, offset + (digest == Digest.of(b"shifted")), body)

    network.serve("memory://nothing", _echo)
    network.serve("memory://a", _echo, source)
    transport = network.transport()
    client = await transport.connect(PeerAddress("memory://nothing"))
    with pytest.raises(TransportError, match="serves no blobs"):
        await client.open_blob(DIGEST)
    client = await transport.connect(PeerAddress("memory://a"))
    for name, match in [
        (b"none", "does not serve"),
        (b"raise", "no disk"),
        (b"shifted", "from byte 4, not 3"),
    ]:
        with pytest.raises(TransportError, match=match):
            await client.open_blob(Digest.of(name), offset=3)
        with pytest.raises(TransportError, match=match):
            await _read(client.fetch_blob(Digest.of(name), offset=3))
    got = bytearray()
    with pytest.raises(TransportError, match="disk gone"):
        async for chunk in client.fetch_blob(Digest.of(b"broken")):
            got += chunk
    assert got == b"part"
    assert bodies[-1].state() == (True, True)
    blob = await client.open_blob(Digest.of(b"fine"), offset=7)
    assert (blob.size, blob.offset, blob.path) == (100, 7, None)
    assert bodies[-1].state() == (False, False)
    await blob.body.aclose()  # type: ignore[attr-defined]
    assert bodies[-1].state() == (False, True)  # closed unstarted
    assert [c async for c in blob.body] == []
    blob = await client.open_blob(Digest.of(b"fine"))
    assert [c async for c in blob.body] == [b"part"]
    assert bodies[-1].state() == (True, True)  # closed at the end


@pytest.mark.anyio
async def test_open_blob_announces_size_under_faults(store: MemoryBlobStore) -> None:
    network = MemoryNetwork()
    a = network.serve("memory://a", _echo, store)
    network.faults(a).truncate_after = 10
    client = await network.transport().connect(a)
    blob = await client.open_blob(DIGEST, offset=5)
    assert (blob.size, blob.offset) == (len(DATA), 5)
    assert await _read(blob.body) == DATA[5:15]  # the caller must notice the short read


@pytest.mark.anyio
async def test_store_blob_source() -> None:
    store = MemoryBlobStore()
    info = await store.put_bytes(b"0123456789")
    source = store_blob_source(store)
    blob = await source(info.digest, 4)
    assert blob is not None
    assert (blob.size, blob.offset, blob.path) == (10, 4, None)
    assert await _read(blob.body) == b"456789"
    assert await source(info.digest, 11) is None
    assert await source(info.digest, -1) is None
    assert await source(Digest.of(b"other"), 0) is None
    blob = await source(info.digest, 10)
    assert blob is not None
    assert await _read(blob.body) == b""


@pytest.mark.anyio
async def test_handler_misbehaviour_is_transport_error() -> None:
    network = MemoryNetwork(max_frame_size=10)

    async def bad(frame: bytes) -> bytes:
        return "text" if frame == b"str" else b"x" * 11  # type: ignore[return-value]

    network.serve("memory://a", bad)
    client = await network.transport().connect(PeerAddress("memory://a"))
    with pytest.raises(TransportError, match="not bytes"):
        await client.request(b"str", timeout=1)
    with pytest.raises(TransportError, match="reply of 11 bytes"):
        await client.request(b"big reply", timeout=1)
    with pytest.raises(TransportError, match="request frame of 11 bytes"):
        await client.request(b"y" * 11, timeout=1)


@pytest.mark.anyio
async def test_usage_errors() -> None:
    network = MemoryNetwork()
    network.serve("memory://a", _echo)
    with pytest.raises(UsageError):
        network.serve("memory://a", _echo)
    with pytest.raises(UsageError):
        network.serve("", _echo)
    with pytest.raises(UsageError):
        MemoryNetwork(max_frame_size=-1)
    transport = network.transport()
    with pytest.raises(UsageError):
        await transport.connect("memory://a")  # type: ignore[arg-type]
    client = await transport.connect(PeerAddress("memory://a"))
    with pytest.raises(UsageError):
        await client.request("text", timeout=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await client.request(b"x", timeout=0)
    with pytest.raises(ValueError):
        client.fetch_blob(DIGEST, offset=-1)
    with pytest.raises(ValueError):
        client.fetch_blob(DIGEST, timeout=-1)
    with pytest.raises(UsageError):
        client.fetch_blob("sha256:" + "0" * 64)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_node_ids_must_agree() -> None:
    network = MemoryNetwork()
    network.serve(PeerAddress("memory://a", node_id="node-a"), _echo)
    network.serve(PeerAddress("memory://anon"), _echo)
    transport = network.transport()
    assert await transport.connect(PeerAddress("memory://a"))
    assert await transport.connect(PeerAddress("memory://a", node_id="node-a"))
    assert await transport.connect(PeerAddress("memory://anon", node_id="whoever"))
    with pytest.raises(TransportError, match="not the expected"):
        await transport.connect(PeerAddress("memory://a", node_id="node-b"))


@pytest.mark.anyio
async def test_serving_addresses_and_stop() -> None:
    network = MemoryNetwork()
    async with network.serving(_echo) as first, network.serving(_echo) as second:
        assert first != second
        assert network.addresses == [first, second]
        assert first.url.startswith("memory://peer-")
    assert network.addresses == []
    async with network.serving(_echo, address="memory://fixed") as fixed:
        assert fixed == PeerAddress("memory://fixed")
        assert network.new_address("node") == PeerAddress("memory://node-3")
    assert network.stop("memory://fixed") is False


@pytest.mark.anyio
async def test_transport_close_closes_clients() -> None:
    network = MemoryNetwork()
    network.serve("memory://a", _echo)
    transport = MemoryTransport(network, "memory://me")
    client = await transport.connect(PeerAddress("memory://a"))
    await transport.aclose()
    assert client.closed
    with pytest.raises(StoreClosed):
        await client.request(b"x", timeout=1)


@pytest.mark.anyio
async def test_client_closed_mid_stream(store: MemoryBlobStore) -> None:
    network = MemoryNetwork()
    a = network.serve("memory://a", _echo, store)
    big = await store.put_bytes(bytes(3 << 20))
    client = await network.transport().connect(a)
    chunks = client.fetch_blob(big.digest)
    await chunks.__anext__()
    await client.aclose()
    with pytest.raises(PyrsiaError):
        await chunks.__anext__()


# --------------------------------------------------------------------------- upstream extras


@pytest.mark.anyio
async def test_upstream_records_calls_and_chunks() -> None:
    upstream = MemoryUpstream(chunk_size=4)
    digest = upstream.add("a", b"0123456789", "text/plain")
    assert digest == Digest.of(b"0123456789")
    response = await upstream.open("a", accept=["text/plain", "text/*"])
    assert (response.media_type, response.size, response.digest) == ("text/plain", 10, digest)
    assert [c async for c in response.body] == [b"0123", b"4567", b"89"]
    with pytest.raises(UpstreamNotFoundError):
        await upstream.open("b")
    assert upstream.calls == [UpstreamCall("a", ("text/plain", "text/*")), UpstreamCall("b")]
    assert (upstream.opened("a"), upstream.opened("b"), upstream.opened("c")) == (1, 1, 0)
    with pytest.raises(UsageError):
        upstream.add("x", "text")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        MemoryUpstream(chunk_size=0)


@pytest.mark.anyio
async def test_upstream_tamper_and_fail() -> None:
    upstream = MemoryUpstream({"m": ("application/json", b"original")})
    upstream.tamper("m", b"tampered!")
    response = await upstream.open("m")
    assert (response.size, response.digest) == (8, Digest.of(b"original"))
    assert b"".join([c async for c in response.body]) == b"tampered!"
    upstream.add("m", b"fresh")  # re-adding undoes the tampering
    assert b"".join([c async for c in (await upstream.open("m")).body]) == b"fresh"
    with pytest.raises(UsageError):
        upstream.tamper("nothing", b"")
    upstream.fail("m", TransportError("upstream unreachable"))
    with pytest.raises(TransportError):
        await upstream.open("m")
    upstream.fail("m", None)
    assert (await upstream.open("m")).size == 5


def test_errors_are_pyrsia_errors() -> None:
    assert issubclass(TransportError, PyrsiaError)
    assert issubclass(UpstreamNotFoundError, PyrsiaError)
    assert issubclass(UpstreamNotFoundError, LookupError)
    assert issubclass(PackageIdError, UsageError)
    assert issubclass(PackageIdError, ValueError)


# --------------------------------------------------------------------------- package type extras


def test_memory_package_type() -> None:
    pt = MemoryPackageType.from_config({})
    manifest = MemoryPackageType.manifest([_D2, _D1])
    assert manifest == b'{"refs":["%s","%s"]}' % (str(_D2).encode(), str(_D1).encode())
    assert pt.references(manifest, pt.MEDIA_TYPE) == [
        (_D2, pt.BLOB_MEDIA_TYPE),
        (_D1, pt.BLOB_MEDIA_TYPE),
    ]
    for content, media_type in [
        (manifest, "text/plain"),
        (b'{"refs": [], "extra": 1}', pt.MEDIA_TYPE),
        (b'{"refs": "sha256:x"}', pt.MEDIA_TYPE),
        (b'{"refs": ["sha256:x"]}', pt.MEDIA_TYPE),
        (b'{"refs": [1.5]}', pt.MEDIA_TYPE),
        (b"[]", pt.MEDIA_TYPE),
        (b" " * (pt.MAX_CONTENT_SIZE + 1), pt.MEDIA_TYPE),
    ]:
        with pytest.raises(ValueError):
            pt.references(content, media_type)
    with pytest.raises(PackageIdError):
        pt.parse_package_id(None)  # type: ignore[arg-type]


def test_testing_package_is_still_pure() -> None:
    code = (
        "import sys; before = set(sys.modules); import pyrsia_core.testing; "
        "bad = {'anyio', 'asyncio', 'trio', 'socket', 'pathlib', 'pytest', 'hypothesis'} "
        "& (set(sys.modules) - before); print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
