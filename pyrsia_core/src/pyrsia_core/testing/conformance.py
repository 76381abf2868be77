"""Conformance suites for plugins (STYLE P12).

A plugin author subclasses a suite in a test module and overrides its fixtures
(``store`` for the storage suites, ``transport_pair`` for transports,
``upstream``/``known``/``missing`` for upstreams, ``package_type``/``valid_ids``/
``invalid_ids``/``samples`` for package types), as with fsspec's abstract
tests; see the class docstrings for the exact code. The async tests are
``@pytest.mark.anyio`` coroutines, so anyio's pytest plugin runs them on each
backend of the ``anyio_backend`` fixture (override that fixture, e.g.
``return "asyncio"``, to pick one).

This module imports pytest and hypothesis (the ``pyrsia-core[testing]`` extra);
the rest of :mod:`pyrsia_core.testing` does not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, ClassVar, Final

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .._digest import Digest
from ..errors import (
    ArtifactUnavailable,
    BlobNotFound,
    DigestMismatch,
    PyrsiaError,
    QuotaExceeded,
    StoreClosed,
    TransportError,
    UsageError,
)
from ..interfaces import (
    ASGIApp,
    BlobInfo,
    BlobSource,
    BlobStore,
    BuildInfo,
    BuiltArtifact,
    KeyValueStore,
    LoggedArtifact,
    MemorySink,
    PackageHost,
    PackageType,
    PeerAddress,
    PeerBlob,
    PeerClient,
    PeerTransport,
    RequestHandler,
    Upstream,
    UpstreamResponse,
    VerifiedBlob,
    memory_blob,
)
from ._memory import MemoryBlobStore
from ._network import store_blob_source

__all__ = [
    "BlobStoreConformance",
    "KeyValueStoreConformance",
    "MemoryPackageHost",
    "PackageTypeConformance",
    "PeerTransportConformance",
    "TransportPair",
    "UpstreamConformance",
]

MiB: Final = 1 << 20

#: Largest chunk a store's ``open()`` may yield: reads must stream.
MAX_READ_CHUNK: Final = 16 * MiB


class _SourceError(Exception):
    """Raised by a chunk source in the middle of a put."""


async def _stream(data: bytes, chunk_size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for pos in range(0, len(data), chunk_size):
        yield data[pos : pos + chunk_size]
    if not data:
        yield b""


async def _read(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def _blob(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


async def _digests(store: BlobStore) -> list[Digest]:
    return [d async for d in store.iter_digests()]


async def _assert_absent(store: BlobStore, digest: Digest, usage_before: int) -> None:
    """Nothing of a failed put is visible."""
    assert await store.stat(digest) is None
    assert digest not in await _digests(store)
    assert await store.usage() == usage_before
    with pytest.raises(BlobNotFound):
        await _read(store.open(digest))


# --------------------------------------------------------------------------- blob stores


class BlobStoreConformance:
    """The contract of :class:`~pyrsia_core.interfaces.BlobStore`, as pytest tests.

    Subclass it in a test module and override the ``store`` fixture::

        class TestMyBlobStore(BlobStoreConformance):
            @pytest.fixture
            async def store(self, tmp_path):
                async with MyBlobStore(tmp_path / "blobs") as store:
                    yield store

    Each test gets a fresh, empty store. The quota tests set ``store.quota`` on
    the instance, so read the attribute at every ``put``.
    """

    pytestmark: ClassVar[Any] = [pytest.mark.anyio]

    @pytest.fixture
    def store(self) -> BlobStore:
        raise NotImplementedError(f"{type(self).__name__} must override the 'store' fixture")

    # -- put, stat, open

    async def test_round_trip(self, store: BlobStore) -> None:
        data = _blob(300_000)
        info = await store.put(_stream(data))
        assert isinstance(info, BlobInfo)
        assert info.digest == Digest.of(data)
        assert info.size == len(data)
        stat = await store.stat(info.digest)
        assert stat is not None
        assert (stat.digest, stat.size) == (info.digest, len(data))
        assert await _read(store.open(info.digest)) == data
        assert await store.read_bytes(info.digest) == data

    async def test_put_bytes(self, store: BlobStore) -> None:
        info = await store.put_bytes(b"hello", expected=Digest.of(b"hello"))
        assert (info.digest, info.size) == (Digest.of(b"hello"), 5)
        assert await store.read_bytes(info.digest) == b"hello"

    async def test_empty_blob(self, store: BlobStore) -> None:
        info = await store.put(_stream(b""), expected=Digest.of(b""), expected_size=0)
        assert (info.digest, info.size) == (Digest.of(b""), 0)
        assert await store.read_bytes(info.digest) == b""
        stat = await store.stat(info.digest)
        assert stat is not None
        assert stat.size == 0
        assert await store.usage() == 0
        assert info.digest in await _digests(store)

    async def test_empty_source(self, store: BlobStore) -> None:
        async def nothing() -> AsyncIterator[bytes]:
            return
            yield b""  # pragma: no cover

        info = await store.put(nothing())
        assert (info.digest, info.size) == (Digest.of(b""), 0)

    async def test_put_with_expected_digest_and_size(self, store: BlobStore) -> None:
        data = _blob(70_000, seed=1)
        info = await store.put(_stream(data), expected=Digest.of(data), expected_size=len(data))
        assert (info.digest, info.size) == (Digest.of(data), len(data))
        assert await store.read_bytes(info.digest) == data

    async def test_digest_mismatch_stores_nothing(self, store: BlobStore) -> None:
        data = _blob(200_000, seed=2)
        claimed = Digest.of(b"something else")
        before = await store.usage()
        with pytest.raises(DigestMismatch):
            await store.put(_stream(data), expected=claimed)
        await _assert_absent(store, claimed, before)
        await _assert_absent(store, Digest.of(data), before)
        assert await _digests(store) == []

    @pytest.mark.parametrize("delta", [-1, 1, -100_000])
    async def test_expected_size_mismatch_stores_nothing(
        self, store: BlobStore, delta: int
    ) -> None:
        data = _blob(150_000, seed=3)
        before = await store.usage()
        with pytest.raises(DigestMismatch):
            await store.put(_stream(data), expected_size=len(data) + delta)
        with pytest.raises(DigestMismatch):
            await store.put(
                _stream(data), expected=Digest.of(data), expected_size=len(data) + delta
            )
        await _assert_absent(store, Digest.of(data), before)

    async def test_failing_source_stores_nothing(self, store: BlobStore) -> None:
        data = _blob(100_000, seed=4)

        async def broken() -> AsyncIterator[bytes]:
            yield data[:50_000]
            raise _SourceError("connection reset")

        before = await store.usage()
        with pytest.raises(_SourceError):
            await store.put(broken(), expected=Digest.of(data))
        await _assert_absent(store, Digest.of(data), before)
        assert await _digests(store) == []

    async def test_put_existing_is_idempotent(self, store: BlobStore) -> None:
        data = _blob(120_000, seed=5)
        first = await store.put(_stream(data))
        usage = await store.usage()
        second = await store.put(_stream(data, 7_000), expected=first.digest)
        third = await store.put_bytes(data)
        assert (second.digest, second.size) == (first.digest, first.size)
        assert (third.digest, third.size) == (first.digest, first.size)
        assert await store.usage() == usage
        assert await _digests(store) == [first.digest]
        assert await store.read_bytes(first.digest) == data

    async def test_put_existing_still_verifies(self, store: BlobStore) -> None:
        data = _blob(10_000, seed=6)
        info = await store.put_bytes(data)
        with pytest.raises(DigestMismatch):
            await store.put(_stream(data[:-1]), expected=info.digest)
        assert await store.read_bytes(info.digest) == data

    # -- ranges

    @pytest.mark.parametrize(
        ("offset", "length", "start", "stop"),
        [
            (0, None, 0, 5000),
            (1, None, 1, 5000),
            (4999, None, 4999, 5000),
            (5000, None, 5000, 5000),  # offset at the end: empty
            (0, 0, 0, 0),
            (10, 100, 10, 110),
            (4990, 100, 4990, 5000),  # length past the end is cut short
            (5000, 10, 5000, 5000),
        ],
    )
    async def test_range(
        self, store: BlobStore, offset: int, length: int | None, start: int, stop: int
    ) -> None:
        data = _blob(5000, seed=7)
        info = await store.put_bytes(data)
        got = await _read(store.open(info.digest, offset=offset, length=length))
        assert got == data[start:stop]

    async def test_range_across_chunks(self, store: BlobStore) -> None:
        data = _blob(3 * MiB + 123, seed=8)
        info = await store.put(_stream(data, MiB))
        for offset, length in [(MiB - 1, 2), (MiB + 5, 2 * MiB), (123, None), (3 * MiB, 1000)]:
            end = len(data) if length is None else offset + length
            got = await _read(store.open(info.digest, offset=offset, length=length))
            assert got == data[offset:end]

    @given(offset=st.integers(0, 2100), length=st.none() | st.integers(0, 2100))
    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    async def test_range_matches_slicing(
        self, store: BlobStore, offset: int, length: int | None
    ) -> None:
        data = _blob(2000, seed=9)
        info = await store.put_bytes(data)  # idempotent across examples
        if offset > len(data):
            with pytest.raises(ValueError):
                await _read(store.open(info.digest, offset=offset, length=length))
            return
        end = len(data) if length is None else offset + length
        assert (
            await _read(store.open(info.digest, offset=offset, length=length)) == data[offset:end]
        )

    @pytest.mark.parametrize(("offset", "length"), [(5001, None), (10**9, 1), (-1, None), (0, -1)])
    async def test_bad_range_is_value_error(
        self, store: BlobStore, offset: int, length: int | None
    ) -> None:
        info = await store.put_bytes(_blob(5000))
        with pytest.raises(ValueError):
            await _read(store.open(info.digest, offset=offset, length=length))

    # -- unknown blobs, delete, listing, usage

    async def test_unknown_blob(self, store: BlobStore) -> None:
        unknown = Digest.of(b"never stored")
        assert await store.stat(unknown) is None
        assert await store.delete(unknown) is False
        with pytest.raises(BlobNotFound):
            await _read(store.open(unknown))
        with pytest.raises(BlobNotFound):
            await _read(store.open(unknown, offset=1, length=1))
        with pytest.raises(BlobNotFound):
            await store.read_bytes(unknown)

    async def test_delete(self, store: BlobStore) -> None:
        a = await store.put_bytes(b"a" * 1000)
        b = await store.put_bytes(b"b" * 10)
        assert await store.usage() == 1010
        assert await store.delete(a.digest) is True
        assert await store.stat(a.digest) is None
        with pytest.raises(BlobNotFound):
            await store.read_bytes(a.digest)
        assert await store.delete(a.digest) is False
        assert await _digests(store) == [b.digest]
        assert await store.usage() == 10
        assert await store.count() == 1
        # A deleted blob can be stored again.
        again = await store.put_bytes(b"a" * 1000)
        assert again.digest == a.digest
        assert await store.read_bytes(a.digest) == b"a" * 1000
        assert await store.usage() == 1010
        assert await store.count() == 2

    async def test_iter_digests(self, store: BlobStore) -> None:
        assert await _digests(store) == []
        infos = [await store.put_bytes(_blob(n, seed=n)) for n in range(1, 40)]
        assert sorted(await _digests(store)) == sorted(i.digest for i in infos)

    async def test_usage(self, store: BlobStore) -> None:
        assert await store.usage() == 0
        sizes = [0, 1, 1000, 65536, 300_001]
        for n, size in enumerate(sizes):
            await store.put_bytes(_blob(size, seed=100 + n))
        assert await store.usage() == sum(sizes)

    # -- adopt (a file the caller received and verified)

    @staticmethod
    def _received(tmp_path: Any, data: bytes) -> tuple[str, Callable[[], AsyncIterator[bytes]]]:
        path = tmp_path / "received.part"
        path.write_bytes(data)

        def read() -> AsyncIterator[bytes]:
            return _stream(path.read_bytes())

        return str(path), read

    async def test_adopt_stores_the_verified_file(self, store: BlobStore, tmp_path: Any) -> None:
        data = _blob(300_000, seed=40)
        path, read = self._received(tmp_path, data)
        info = await store.adopt(path, Digest.of(data), len(data), read)
        assert (info.digest, info.size) == (Digest.of(data), len(data))
        assert await store.read_bytes(info.digest) == data
        assert await store.usage() == len(data)
        assert info.digest in await _digests(store)
        # Adopting it again (a second fetch of the same blob) changes nothing.
        path, read = self._received(tmp_path, data)
        await store.adopt(path, Digest.of(data), len(data), read)
        assert await store.usage() == len(data)
        assert await store.read_bytes(info.digest) == data

    async def test_adopt_of_a_file_of_another_size_stores_nothing(
        self, store: BlobStore, tmp_path: Any
    ) -> None:
        data = _blob(100_000, seed=41)
        path, read = self._received(tmp_path, data[:-1])  # one byte short of the claim
        with pytest.raises(DigestMismatch):
            await store.adopt(path, Digest.of(data), len(data), read)
        await _assert_absent(store, Digest.of(data), 0)

    async def test_adopt_respects_the_quota(self, store: BlobStore, tmp_path: Any) -> None:
        store.quota = 1000
        data = _blob(1001, seed=42)
        path, read = self._received(tmp_path, data)
        with pytest.raises(QuotaExceeded):
            await store.adopt(path, Digest.of(data), len(data), read)
        await _assert_absent(store, Digest.of(data), 0)

    # -- quota

    async def test_quota_refuses_and_stores_nothing(self, store: BlobStore) -> None:
        await store.put_bytes(_blob(1000, seed=10))
        store.quota = 1500
        big = _blob(501, seed=11)
        # Known size and digest: refused up front; unknown: refused once streamed.
        with pytest.raises(QuotaExceeded):
            await store.put(_stream(big), expected=Digest.of(big), expected_size=len(big))
        with pytest.raises(QuotaExceeded):
            await store.put(_stream(big, 100))
        await _assert_absent(store, Digest.of(big), 1000)
        huge = _blob(5000, seed=12)  # larger than the whole quota
        with pytest.raises(QuotaExceeded):
            await store.put(_stream(huge, 100))
        await _assert_absent(store, Digest.of(huge), 1000)

    async def test_quota_exact_fit(self, store: BlobStore) -> None:
        store.quota = 1500
        await store.put_bytes(_blob(1000, seed=13))
        info = await store.put(_stream(_blob(500, seed=14)))
        assert await store.usage() == 1500
        # Full, yet storing a blob that is already there costs nothing.
        again = await store.put(_stream(_blob(500, seed=14)), expected=info.digest)
        assert again.digest == info.digest
        with pytest.raises(QuotaExceeded):
            await store.put_bytes(b"x")
        # Deleting makes room.
        await store.delete(info.digest)
        await store.put_bytes(b"x")
        assert await store.usage() == 1001

    async def test_quota_none_is_unlimited(self, store: BlobStore) -> None:
        store.quota = None
        await store.put_bytes(_blob(MiB))
        assert await store.usage() == MiB

    # -- concurrency and streaming

    async def test_concurrent_puts_of_one_blob(self, store: BlobStore) -> None:
        # anyio is there: its pytest plugin runs this suite. Imported here so
        # that importing the module stays free of an async library.
        import anyio

        data = _blob(256 * 1024, seed=15)
        digest = Digest.of(data)
        results: list[BlobInfo] = []

        async def slow() -> AsyncIterator[bytes]:
            for pos in range(0, len(data), 16 * 1024):
                await anyio.lowlevel.checkpoint()
                yield data[pos : pos + 16 * 1024]

        async def one() -> None:
            results.append(await store.put(slow(), expected=digest))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
        assert [(r.digest, r.size) for r in results] == [(digest, len(data))] * 8
        assert await store.usage() == len(data)
        assert await _digests(store) == [digest]
        assert await store.read_bytes(digest) == data

    async def test_concurrent_puts_respect_quota(self, store: BlobStore) -> None:
        import anyio

        blobs = [_blob(10_000, seed=20 + n) for n in range(4)]
        store.quota = 25_000  # room for two of the four
        stored: list[Digest] = []
        refused = 0

        async def one(data: bytes) -> None:
            nonlocal refused

            async def slow() -> AsyncIterator[bytes]:
                for pos in range(0, len(data), 1000):
                    await anyio.lowlevel.checkpoint()
                    yield data[pos : pos + 1000]

            try:
                stored.append((await store.put(slow())).digest)
            except QuotaExceeded:
                refused += 1

        async with anyio.create_task_group() as tg:
            for data in blobs:
                tg.start_soon(one, data)
        assert (len(stored), refused) == (2, 2)
        assert await store.usage() == 20_000
        assert sorted(await _digests(store)) == sorted(stored)

    async def test_many_small_chunks(self, store: BlobStore) -> None:
        data = _blob(200_000, seed=30)
        sizes = [1 + (n * 37) % 61 for n in range(20_000)]

        async def tiny() -> AsyncIterator[bytes]:
            pos = 0
            for size in sizes:
                if pos >= len(data):
                    return
                yield data[pos : pos + size]
                pos += size

        info = await store.put(tiny(), expected=Digest.of(data), expected_size=len(data))
        assert info.size == len(data)
        assert await store.read_bytes(info.digest) == data

    async def test_large_streamed_blob(self, store: BlobStore) -> None:
        size = 64 * MiB
        expected = hashlib.sha256()
        for n in range(64):
            expected.update(n.to_bytes(4, "big") * (MiB // 4))
        digest = Digest(expected.hexdigest())

        async def chunks() -> AsyncIterator[bytes]:
            for n in range(64):
                yield n.to_bytes(4, "big") * (MiB // 4)

        info = await store.put(chunks(), expected=digest, expected_size=size)
        assert (info.digest, info.size) == (digest, size)
        got = hashlib.sha256()
        total = 0
        async for chunk in store.open(digest):
            assert len(chunk) <= MAX_READ_CHUNK, "open() must stream, not read the whole blob"
            got.update(chunk)
            total += len(chunk)
        assert (total, got.hexdigest()) == (size, digest.hex)
        tail = await _read(store.open(digest, offset=size - 10))
        assert tail == ((63).to_bytes(4, "big") * 3)[2:]

    # -- lifecycle

    async def test_closed_store_raises(self, store: BlobStore) -> None:
        info = await store.put_bytes(b"kept")
        await store.aclose()
        assert store.closed
        with pytest.raises(StoreClosed):
            await store.put_bytes(b"more")
        with pytest.raises(StoreClosed):
            await store.stat(info.digest)
        with pytest.raises(StoreClosed):
            await _read(store.open(info.digest))
        with pytest.raises(StoreClosed):
            await store.delete(info.digest)
        with pytest.raises(StoreClosed):
            await _digests(store)
        with pytest.raises(StoreClosed):
            await store.usage()
        await store.aclose()  # idempotent


# --------------------------------------------------------------------------- key/value stores

#: Keys chosen to sit on the edges of prefix arithmetic.
_EDGE_KEYS: Final = [
    b"",
    b"\x00",
    b"a",
    b"a\x00",
    b"a\xfe\xff",
    b"a\xff",
    b"a\xff\x00",
    b"a\xff\xff",
    b"a\xff\xff\xff",
    b"ab",
    b"b",
    b"b\x00",
    b"\xfe",
    b"\xff",
    b"\xff\x00",
    b"\xff\xff",
]

_PERSISTENCE_TESTS: Final = (
    "test_reopen_keeps_writes",
    "test_reopen_keeps_nothing_of_a_failed_batch",
)


async def _scan(
    store: KeyValueStore,
    prefix: bytes = b"",
    *,
    start: bytes | None = None,
    reverse: bool = False,
    limit: int | None = None,
) -> list[tuple[bytes, bytes]]:
    return [kv async for kv in store.scan(prefix, start=start, reverse=reverse, limit=limit)]


async def _keys(store: KeyValueStore, prefix: bytes = b"", **kwargs: Any) -> list[bytes]:
    return [k for k, _ in await _scan(store, prefix, **kwargs)]


async def _fill(store: KeyValueStore, keys: Iterable[bytes]) -> None:
    async with store.batch() as batch:
        for key in keys:
            batch.put(key, b"v:" + key)


def _model_scan(
    model: dict[bytes, bytes],
    prefix: bytes,
    start: bytes | None,
    reverse: bool,
    limit: int | None,
) -> list[tuple[bytes, bytes]]:
    keys = sorted(k for k in model if k.startswith(prefix))
    if start is not None:
        keys = [k for k in keys if (k <= start if reverse else k >= start)]
    if reverse:
        keys.reverse()
    if limit is not None:
        keys = keys[:limit]
    return [(k, model[k]) for k in keys]


_key_strategy = st.sampled_from(_EDGE_KEYS) | st.binary(max_size=3)
_prefix_strategy = st.sampled_from([b"", b"a", b"a\xff", b"a\xff\xff", b"b", b"\xff", b"\x00"]) | (
    st.binary(max_size=2)
)
_batches_strategy = st.lists(
    st.lists(st.tuples(_key_strategy, st.none() | st.binary(max_size=6)), max_size=12),
    max_size=4,
)


class KeyValueStoreConformance:
    """The contract of :class:`~pyrsia_core.interfaces.KeyValueStore`, as pytest tests.

    Subclass it in a test module and override the ``store`` fixture; a store that
    keeps its data also sets ``persistent = True`` and overrides ``reopen``::

        class TestMyStore(KeyValueStoreConformance):
            persistent = True  # adds the reopen tests

            @pytest.fixture
            async def store(self, tmp_path):
                async with MyStore(tmp_path / "db") as store:
                    yield store

            @pytest.fixture
            def reopen(self, tmp_path):
                return lambda: MyStore.open(tmp_path / "db")  # async -> a new store

    Each test gets a fresh, empty store. The reopen tests close ``store`` first.
    """

    pytestmark: ClassVar[Any] = [pytest.mark.anyio]

    #: Whether the store keeps its data across close and ``reopen``. When false,
    #: the reopen tests are not part of the subclass at all (not skipped).
    persistent: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _PERSISTENCE_TESTS:
            test = KeyValueStoreConformance.__dict__[name] if cls.persistent else None
            setattr(cls, name, test)

    @pytest.fixture
    def store(self) -> KeyValueStore:
        raise NotImplementedError(f"{type(self).__name__} must override the 'store' fixture")

    @pytest.fixture
    def reopen(self) -> Callable[[], Awaitable[KeyValueStore]]:
        raise NotImplementedError(
            f"{type(self).__name__} sets persistent = True, so it must override the 'reopen' "
            "fixture (a callable returning an awaitable new store over the same data)"
        )

    # -- get, put, delete

    async def test_missing_key_is_none(self, store: KeyValueStore) -> None:
        assert await store.get(b"nope") is None
        assert await store.get(b"") is None
        assert await _scan(store) == []

    async def test_put_get_delete(self, store: KeyValueStore) -> None:
        await store.put(b"k", b"v")
        assert await store.get(b"k") == b"v"
        await store.delete(b"k")
        assert await store.get(b"k") is None
        await store.delete(b"k")  # deleting a missing key is not an error
        assert await _scan(store) == []

    async def test_overwrite(self, store: KeyValueStore) -> None:
        await store.put(b"k", b"one")
        await store.put(b"k", b"two")
        assert await store.get(b"k") == b"two"
        assert await _scan(store) == [(b"k", b"two")]

    async def test_empty_key_and_value(self, store: KeyValueStore) -> None:
        await store.put(b"", b"")
        await store.put(b"x", b"")
        assert await store.get(b"") == b""
        assert await store.get(b"x") == b""
        assert await _scan(store) == [(b"", b""), (b"x", b"")]

    async def test_binary_keys_and_values(self, store: KeyValueStore) -> None:
        pairs = {
            bytes([i, 255 - i, 0]): bytes((i + j) % 256 for j in range(20))
            for i in range(0, 256, 5)
        }
        async with store.batch() as batch:
            for key, value in pairs.items():
                batch.put(key, value)
        for key, value in pairs.items():
            assert await store.get(key) == value
        assert await _scan(store) == sorted(pairs.items())

    async def test_large_value(self, store: KeyValueStore) -> None:
        value = _blob(MiB, seed=40)
        await store.put(b"big", value)
        await store.put(b"big2", value[::-1])
        assert await store.get(b"big") == value
        assert await _scan(store, b"big") == [(b"big", value), (b"big2", value[::-1])]

    async def test_non_bytes_is_usage_error(self, store: KeyValueStore) -> None:
        with pytest.raises(UsageError):
            await store.put("key", b"v")  # type: ignore[arg-type]
        with pytest.raises(UsageError):
            await store.put(b"key", "v")  # type: ignore[arg-type]
        with pytest.raises(UsageError):
            await store.delete(1)  # type: ignore[arg-type]
        assert await _scan(store) == []

    # -- scans

    async def test_scan_prefix_in_key_order(self, store: KeyValueStore) -> None:
        keys = [b"p/3", b"p/1", b"q/0", b"p/10", b"o/9", b"p/2", b"p", b"p/"]
        await _fill(store, keys)
        assert await _scan(store, b"p/") == [
            (b"p/", b"v:p/"),
            (b"p/1", b"v:p/1"),
            (b"p/10", b"v:p/10"),
            (b"p/2", b"v:p/2"),
            (b"p/3", b"v:p/3"),
        ]
        assert await _keys(store, b"p") == [b"p", b"p/", b"p/1", b"p/10", b"p/2", b"p/3"]
        assert await _keys(store, b"r") == []
        assert await _keys(store, b"p/10/") == []

    async def test_scan_empty_prefix_returns_everything(self, store: KeyValueStore) -> None:
        await _fill(store, _EDGE_KEYS)
        assert await _keys(store) == sorted(_EDGE_KEYS)
        assert await _keys(store, reverse=True) == sorted(_EDGE_KEYS, reverse=True)

    async def test_scan_reverse(self, store: KeyValueStore) -> None:
        await _fill(store, [b"a", b"b/1", b"b/2", b"b/3", b"c"])
        assert await _keys(store, b"b/", reverse=True) == [b"b/3", b"b/2", b"b/1"]
        assert await _keys(store, b"c", reverse=True) == [b"c"]
        assert await _keys(store, b"d", reverse=True) == []

    async def test_scan_start_forward(self, store: KeyValueStore) -> None:
        await _fill(store, [b"k/1", b"k/3", b"k/5", b"l"])
        assert await _keys(store, b"k/", start=b"k/3") == [b"k/3", b"k/5"]  # present: included
        assert await _keys(store, b"k/", start=b"k/2") == [b"k/3", b"k/5"]  # absent: next one
        assert await _keys(store, b"k/", start=b"k/") == [b"k/1", b"k/3", b"k/5"]
        assert await _keys(store, b"k/", start=b"k/6") == []
        assert await _keys(store, start=b"k/4") == [b"k/5", b"l"]

    async def test_scan_start_reverse(self, store: KeyValueStore) -> None:
        await _fill(store, [b"j", b"k/1", b"k/3", b"k/5", b"l"])
        assert await _keys(store, b"k/", start=b"k/3", reverse=True) == [b"k/3", b"k/1"]
        assert await _keys(store, b"k/", start=b"k/4", reverse=True) == [b"k/3", b"k/1"]
        assert await _keys(store, b"k/", start=b"k/9", reverse=True) == [b"k/5", b"k/3", b"k/1"]
        assert await _keys(store, b"k/", start=b"k/", reverse=True) == []
        assert await _keys(store, b"k/", start=b"k/0", reverse=True) == []
        assert await _keys(store, start=b"k/2", reverse=True) == [b"k/1", b"j"]
        assert await _keys(store, b"k", start=b"k", reverse=True) == []

    async def test_scan_limit(self, store: KeyValueStore) -> None:
        await _fill(store, [b"n/%d" % i for i in range(10)])
        assert await _keys(store, b"n/", limit=0) == []
        assert await _keys(store, b"n/", limit=1) == [b"n/0"]
        assert await _keys(store, b"n/", limit=3) == [b"n/0", b"n/1", b"n/2"]
        assert await _keys(store, b"n/", limit=100) == [b"n/%d" % i for i in range(10)]
        assert await _keys(store, b"n/", limit=2, reverse=True) == [b"n/9", b"n/8"]
        assert await _keys(store, b"n/", start=b"n/5", limit=2) == [b"n/5", b"n/6"]
        assert await _keys(store, b"n/", start=b"n/5", limit=2, reverse=True) == [b"n/5", b"n/4"]
        assert await _keys(store, b"n/", start=b"n/8", limit=5) == [b"n/8", b"n/9"]

    async def test_scan_0xff_prefixes(self, store: KeyValueStore) -> None:
        await _fill(store, _EDGE_KEYS)
        assert await _keys(store, b"a\xff") == [
            b"a\xff",
            b"a\xff\x00",
            b"a\xff\xff",
            b"a\xff\xff\xff",
        ]
        assert await _keys(store, b"a\xff", reverse=True) == [
            b"a\xff\xff\xff",
            b"a\xff\xff",
            b"a\xff\x00",
            b"a\xff",
        ]
        assert await _keys(store, b"a\xff\xff") == [b"a\xff\xff", b"a\xff\xff\xff"]
        assert await _keys(store, b"a\xff", start=b"a\xff\x00") == [
            b"a\xff\x00",
            b"a\xff\xff",
            b"a\xff\xff\xff",
        ]
        assert await _keys(store, b"a\xff", start=b"a\xff\x00", reverse=True) == [
            b"a\xff\x00",
            b"a\xff",
        ]
        assert await _keys(store, b"\xff") == [b"\xff", b"\xff\x00", b"\xff\xff"]
        assert await _keys(store, b"\xff", reverse=True) == [b"\xff\xff", b"\xff\x00", b"\xff"]
        assert await _keys(store, b"\xff\xff", reverse=True) == [b"\xff\xff"]
        assert await _keys(store, b"a", reverse=True, limit=2) == [b"a\xff\xff\xff", b"a\xff\xff"]
        assert await _keys(store, b"\x00") == [b"\x00"]
        assert await _keys(store, b"", start=b"", limit=2) == [b"", b"\x00"]
        assert await _keys(store, b"", start=b"", reverse=True) == [b""]

    async def test_scan_arguments_are_checked(self, store: KeyValueStore) -> None:
        with pytest.raises(UsageError):
            store.scan(b"a/", start=b"b/")
        with pytest.raises(UsageError):
            store.scan(b"a/", limit=-1)

    async def test_scan_many_keys(self, store: KeyValueStore) -> None:
        keys = [b"m/%05d" % i for i in range(3000)]
        async with store.batch() as batch:
            batch.put(b"l", b"before")
            batch.put(b"n", b"after")
            for key in reversed(keys):
                batch.put(key, key[2:])
        assert await _keys(store, b"m/") == keys
        assert await _keys(store, b"m/", reverse=True) == keys[::-1]
        assert await _keys(store, b"m/", start=b"m/01234", limit=1500) == keys[1234:2734]
        assert (
            await _keys(store, b"m/", start=b"m/02000", reverse=True, limit=1500)
            == (keys[501:2001][::-1])
        )
        assert len(await _scan(store)) == 3002

    async def test_scan_survives_concurrent_writes(self, store: KeyValueStore) -> None:
        await _fill(store, [b"w/%03d" % i for i in range(100)])
        for reverse in (False, True):
            seen: list[bytes] = []
            async for key, _ in store.scan(b"w/", reverse=reverse):
                seen.append(key)
                if len(seen) == 10:
                    async with store.batch() as batch:
                        batch.delete(b"w/050")
                        batch.put(b"w/0505", b"new")
                        batch.put(b"w/000", b"changed")
            assert seen == sorted(set(seen), reverse=reverse)  # ordered, no repeats
            await _fill(store, [b"w/050"])
            await store.delete(b"w/0505")

    async def test_abandoned_scan(self, store: KeyValueStore) -> None:
        await _fill(store, [b"s/%04d" % i for i in range(2000)])
        scan = store.scan(b"s/")
        first = await scan.__anext__()
        assert first[0] == b"s/0000"
        aclose = getattr(scan, "aclose", None)
        if aclose is not None:
            await aclose()
        await store.put(b"s/x", b"1")
        assert await store.get(b"s/x") == b"1"

    # -- batches

    async def test_batch_is_atomic(self, store: KeyValueStore) -> None:
        await store.put(b"keep", b"old")

        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            async with store.batch() as batch:
                batch.put(b"keep", b"new")
                batch.put(b"other", b"x")
                batch.delete(b"keep")
                raise Boom
        assert await store.get(b"keep") == b"old"
        assert await store.get(b"other") is None
        assert await _scan(store) == [(b"keep", b"old")]

    async def test_batch_applies_in_order(self, store: KeyValueStore) -> None:
        await store.put(b"existing", b"1")
        async with store.batch() as batch:
            batch.put(b"a", b"1")
            batch.delete(b"a")  # put then delete: gone
            batch.delete(b"existing")
            batch.put(b"existing", b"2")  # delete then put: there
            batch.put(b"c", b"1")
            batch.put(b"c", b"2")  # the last put wins
        assert await store.get(b"a") is None
        assert await store.get(b"existing") == b"2"
        assert await store.get(b"c") == b"2"
        assert await _scan(store) == [(b"c", b"2"), (b"existing", b"2")]

    async def test_empty_batch(self, store: KeyValueStore) -> None:
        async with store.batch():
            pass
        assert await _scan(store) == []

    async def test_batch_is_invisible_until_it_ends(self, store: KeyValueStore) -> None:
        async with store.batch() as batch:
            batch.put(b"later", b"1")
            assert await store.get(b"later") is None
        assert await store.get(b"later") == b"1"

    @given(
        batches=_batches_strategy,
        prefix=_prefix_strategy,
        start_suffix=st.none() | st.binary(max_size=2),
        reverse=st.booleans(),
        limit=st.none() | st.integers(0, 6),
    )
    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    async def test_matches_model(
        self,
        store: KeyValueStore,
        batches: list[list[tuple[bytes, bytes | None]]],
        prefix: bytes,
        start_suffix: bytes | None,
        reverse: bool,
        limit: int | None,
    ) -> None:
        # The store fixture is shared by the examples: empty it first.
        async with store.batch() as wipe:
            async for key, _ in store.scan():
                wipe.delete(key)
        model: dict[bytes, bytes] = {}
        for ops in batches:
            async with store.batch() as batch:
                for key, value in ops:
                    if value is None:
                        batch.delete(key)
                        model.pop(key, None)
                    else:
                        batch.put(key, value)
                        model[key] = value
        for key in _EDGE_KEYS:
            assert await store.get(key) == model.get(key)
        start = None if start_suffix is None else prefix + start_suffix
        got = await _scan(store, prefix, start=start, reverse=reverse, limit=limit)
        assert got == _model_scan(model, prefix, start, reverse, limit)

    # -- lifecycle

    async def test_closed_store_raises(self, store: KeyValueStore) -> None:
        await _fill(store, [b"c/%04d" % i for i in range(1200)])
        ongoing = store.scan(b"c/")
        await ongoing.__anext__()
        await store.aclose()
        assert store.closed
        with pytest.raises(StoreClosed):
            await store.get(b"c/0001")
        with pytest.raises(StoreClosed):
            await store.put(b"k", b"v")
        with pytest.raises(StoreClosed):
            await store.delete(b"k")
        with pytest.raises(StoreClosed):
            await _scan(store)
        with pytest.raises(StoreClosed):
            async with store.batch():
                pass
        with pytest.raises(StoreClosed):
            async for _ in ongoing:
                pass
        await store.aclose()  # idempotent

    # -- persistence (only in subclasses with persistent = True)

    async def test_reopen_keeps_writes(
        self, store: KeyValueStore, reopen: Callable[[], Awaitable[KeyValueStore]]
    ) -> None:
        big = _blob(MiB, seed=41)
        await _fill(store, _EDGE_KEYS)
        await store.put(b"big", big)
        await store.put(b"a", b"overwritten")
        await store.delete(b"b")
        await store.aclose()
        async with await reopen() as again:
            expected = {k: b"v:" + k for k in _EDGE_KEYS if k != b"b"}
            expected[b"a"] = b"overwritten"
            expected[b"big"] = big
            assert await _scan(again) == sorted(expected.items())
            assert await _keys(again, b"a\xff", reverse=True) == [
                b"a\xff\xff\xff",
                b"a\xff\xff",
                b"a\xff\x00",
                b"a\xff",
            ]
            await again.put(b"after", b"reopen")
        async with await reopen() as third:
            assert await third.get(b"after") == b"reopen"
            assert await third.get(b"big") == big

    async def test_reopen_keeps_nothing_of_a_failed_batch(
        self, store: KeyValueStore, reopen: Callable[[], Awaitable[KeyValueStore]]
    ) -> None:
        await store.put(b"k", b"v")
        with pytest.raises(_SourceError):
            async with store.batch() as batch:
                batch.put(b"x", b"1")
                batch.delete(b"k")
                raise _SourceError
        await store.aclose()
        async with await reopen() as again:
            assert await _scan(again) == [(b"k", b"v")]


# --------------------------------------------------------------------------- shared helpers


def _deadline(seconds: float = 30.0) -> AbstractContextManager[Any]:
    """Fail (instead of hanging) if the block takes longer than ``seconds``."""
    import anyio

    return anyio.fail_after(seconds)


async def _close_iterator(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


# --------------------------------------------------------------------------- transports


@attrs.frozen
class TransportPair:
    """What a transport plugin's ``transport_pair`` fixture gives the suite.

    * ``transport``: the connecting side (an open transport; the suite closes it
      in one test, so its fixture must tolerate a second ``aclose``).
    * ``serve``: ``serve(handler, blobs)`` is an async context manager that makes
      a peer answer requests with ``handler`` and blob fetches from ``blobs`` (a
      :data:`~pyrsia_core.interfaces.BlobSource`: ``None`` for blobs it does not
      serve) for the duration of the block, and yields the peer's address -- as
      the node does with :meth:`~pyrsia_core.interfaces.PeerTransport.serve` or
      :meth:`~pyrsia_core.interfaces.PeerTransport.asgi_app`. The suite may serve
      several peers at once.
    * ``unserved``: an address where nobody listens (e.g. a closed local port).
    """

    transport: PeerTransport
    serve: Callable[[RequestHandler, BlobSource], AbstractAsyncContextManager[PeerAddress]]
    unserved: PeerAddress


class _HandlerError(Exception):
    """Raised by a request handler, on the serving side."""


async def _echo(frame: bytes) -> bytes:
    return b"re:" + frame


_TIMEOUT_TESTS: Final = ("test_request_timeout",)


class PeerTransportConformance:
    """The contract of :class:`~pyrsia_core.interfaces.PeerTransport` and its clients.

    Subclass it and override the ``transport_pair`` fixture to return a
    :class:`TransportPair`::

        class TestMyTransport(PeerTransportConformance):
            @pytest.fixture
            async def transport_pair(self):
                @asynccontextmanager
                async def serve(handler, blobs):
                    async with anyio.create_task_group() as tg:
                        transport = MyTransport(host="127.0.0.1", port=0)
                        port = await tg.start(transport.serve, handler, blobs)
                        yield PeerAddress(f"http://127.0.0.1:{port}")
                        tg.cancel_scope.cancel()

                async with MyTransport() as transport:
                    yield TransportPair(transport, serve, PeerAddress("http://127.0.0.1:9"))

    Every failure of the remote side -- nobody listening, a broken connection,
    a timeout, an exception in the peer's handler, an unknown blob -- must reach
    the caller as :class:`~pyrsia_core.testing.TransportError`, promptly: each
    test runs under a deadline, so a hang fails the test. A transport that
    cannot enforce ``timeout`` (only an in-memory one) sets
    ``enforces_timeouts = False``, which removes the timeout test.
    """

    pytestmark: ClassVar[Any] = [pytest.mark.anyio]

    #: Whether ``request(timeout=...)`` gives up on a peer that never answers.
    enforces_timeouts: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _TIMEOUT_TESTS:
            test = PeerTransportConformance.__dict__[name] if cls.enforces_timeouts else None
            setattr(cls, name, test)

    @pytest.fixture
    def transport_pair(self) -> TransportPair:
        raise NotImplementedError(
            f"{type(self).__name__} must override the 'transport_pair' fixture"
        )

    @pytest.fixture
    def blobs(self) -> MemoryBlobStore:
        """The blobs the served peers have (filled by the tests, served whole)."""
        return MemoryBlobStore()

    # -- requests

    async def test_round_trip(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        seen: list[bytes] = []

        async def handler(frame: bytes) -> bytes:
            seen.append(frame)
            return b"re:" + frame

        with _deadline():
            async with transport_pair.serve(handler, store_blob_source(blobs)) as address:
                client = await transport_pair.transport.connect(address)
                async with client:
                    reply = await client.request(b"hello", timeout=10)
                    assert reply == b"re:hello"
                    assert type(reply) is bytes
                    assert await client.request(b"again", timeout=10) == b"re:again"
        assert seen == [b"hello", b"again"]

    async def test_empty_frames(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        seen: list[bytes] = []

        async def handler(frame: bytes) -> bytes:
            seen.append(frame)
            return b"" if frame == b"empty reply" else b"full reply"

        with _deadline():
            async with transport_pair.serve(handler, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    assert await client.request(b"", timeout=10) == b"full reply"
                    assert await client.request(b"empty reply", timeout=10) == b""
        assert seen == [b"", b"empty reply"]

    async def test_binary_frames(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        frame = bytes(range(256)) * 4 + b"\r\n\r\n\x00"

        async def handler(got: bytes) -> bytes:
            return got[::-1]

        with _deadline():
            async with transport_pair.serve(handler, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    assert await client.request(frame, timeout=10) == frame[::-1]

    async def test_one_mib_frames(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        request = _blob(MiB, seed=50)
        reply = _blob(MiB, seed=51)

        async def handler(frame: bytes) -> bytes:
            return reply if frame == request else b"wrong request"

        with _deadline():
            async with transport_pair.serve(handler, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    assert await client.request(request, timeout=30) == reply

    async def test_many_concurrent_requests(
        self, transport_pair: TransportPair, blobs: BlobStore
    ) -> None:
        import anyio

        calls = 0

        async def handler(frame: bytes) -> bytes:
            nonlocal calls
            calls += 1
            for _ in range(int(frame.split(b":")[1]) % 5):  # replies come back out of order
                await anyio.lowlevel.checkpoint()
            return b"re:" + frame

        replies: dict[bytes, bytes] = {}
        with _deadline():
            async with transport_pair.serve(handler, store_blob_source(blobs)) as address:
                clients = [await transport_pair.transport.connect(address) for _ in range(4)]

                async def one(client: PeerClient, frame: bytes) -> None:
                    replies[frame] = await client.request(frame, timeout=30)

                async with anyio.create_task_group() as tg:
                    for i in range(100):
                        tg.start_soon(one, clients[i % 4], b"frame:%d" % i)
                for client in clients:
                    await client.aclose()
        assert replies == {b"frame:%d" % i: b"re:frame:%d" % i for i in range(100)}
        assert calls == 100

    async def test_requests_are_handled_concurrently(
        self, transport_pair: TransportPair, blobs: BlobStore
    ) -> None:
        import anyio

        arrived = 0
        all_in = anyio.Event()

        async def handler(frame: bytes) -> bytes:
            # No reply until all four requests are in: a transport that handles
            # one request at a time deadlocks here (and the deadline fails it).
            nonlocal arrived
            arrived += 1
            if arrived == 4:
                all_in.set()
            await all_in.wait()
            return frame

        got: list[bytes] = []
        with _deadline(20):
            async with transport_pair.serve(handler, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:

                    async def one(frame: bytes) -> None:
                        got.append(await client.request(frame, timeout=15))

                    async with anyio.create_task_group() as tg:
                        for i in range(4):
                            tg.start_soon(one, b"%d" % i)
        assert sorted(got) == [b"0", b"1", b"2", b"3"]

    async def test_handler_error_is_transport_error(
        self, transport_pair: TransportPair, blobs: BlobStore
    ) -> None:
        async def handler(frame: bytes) -> bytes:
            if frame == b"fail":
                raise _HandlerError("the handler failed")
            return b"re:" + frame

        with _deadline():
            async with transport_pair.serve(handler, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    with pytest.raises(TransportError):
                        await client.request(b"fail", timeout=10)
                    # The peer (and the connection to it) survives.
                    assert await client.request(b"ok", timeout=10) == b"re:ok"
                    with pytest.raises(TransportError):
                        await client.request(b"fail", timeout=10)

    async def test_request_timeout(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        import anyio

        release = anyio.Event()

        async def handler(frame: bytes) -> bytes:
            if frame == b"hang":
                await release.wait()
            return b"re:" + frame

        with _deadline(20):
            async with transport_pair.serve(handler, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    start = anyio.current_time()
                    with pytest.raises(TransportError):
                        await client.request(b"hang", timeout=0.5)
                    assert anyio.current_time() - start < 10
                    release.set()
                    assert await client.request(b"ok", timeout=10) == b"re:ok"

    async def test_two_peers(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        async def peer_a(frame: bytes) -> bytes:
            return b"a:" + frame

        async def peer_b(frame: bytes) -> bytes:
            return b"b:" + frame

        with _deadline():
            async with transport_pair.serve(peer_a, store_blob_source(blobs)) as addr_a:
                async with transport_pair.serve(peer_b, store_blob_source(blobs)) as addr_b:
                    assert addr_a != addr_b
                    async with await transport_pair.transport.connect(addr_b) as client_b:
                        async with await transport_pair.transport.connect(addr_a) as client_a:
                            assert await client_a.request(b"x", timeout=10) == b"a:x"
                            assert await client_b.request(b"x", timeout=10) == b"b:x"

    # -- blobs

    async def test_fetch_blob(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        data = _blob(2 * MiB + 17, seed=52)
        small = await blobs.put_bytes(b"small blob")
        info = await blobs.put_bytes(data)
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    got = bytearray()
                    async for chunk in client.fetch_blob(info.digest):
                        assert isinstance(chunk, bytes)
                        assert len(chunk) <= MAX_READ_CHUNK
                        got += chunk
                    assert bytes(got) == data
                    assert await _read(client.fetch_blob(small.digest)) == b"small blob"

    @pytest.mark.parametrize("offset", [0, 1, 65_536, MiB + 3, 3 * MiB - 1, 3 * MiB])
    async def test_fetch_blob_with_offset(
        self, transport_pair: TransportPair, blobs: BlobStore, offset: int
    ) -> None:
        data = _blob(3 * MiB, seed=53)
        info = await blobs.put_bytes(data)
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    got = await _read(client.fetch_blob(info.digest, offset=offset))
                    assert got == data[offset:]

    async def test_fetch_empty_blob(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        info = await blobs.put_bytes(b"")
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    assert await _read(client.fetch_blob(info.digest)) == b""

    async def test_fetch_unknown_blob(
        self, transport_pair: TransportPair, blobs: BlobStore
    ) -> None:
        await blobs.put_bytes(b"something else")
        unknown = Digest.of(b"never stored")
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    with pytest.raises(TransportError):
                        await _read(client.fetch_blob(unknown))
                    with pytest.raises(TransportError):
                        await _read(client.fetch_blob(unknown, offset=5))
                    # The connection is still good.
                    assert await client.request(b"ok", timeout=10) == b"re:ok"

    @pytest.mark.parametrize("offset", [0, 1000, 2 * MiB + 17])
    async def test_open_blob(
        self, transport_pair: TransportPair, blobs: BlobStore, offset: int
    ) -> None:
        data = _blob(2 * MiB + 17, seed=56)
        info = await blobs.put_bytes(data)
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    blob = await client.open_blob(info.digest, offset=offset)
                    assert isinstance(blob, PeerBlob)
                    assert blob.offset == offset
                    assert blob.size in (None, len(data)), "size is the whole blob's size"
                    assert await _read(blob.body) == data[offset:]

    async def test_open_unknown_blob(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        unknown = Digest.of(b"never stored")
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    # open_blob may raise, or its body may: either way a TransportError.
                    with pytest.raises(TransportError):
                        blob = await client.open_blob(unknown)
                        await _read(blob.body)

    async def test_unstarted_open_blob_bodies_can_be_closed(
        self, transport_pair: TransportPair, blobs: BlobStore
    ) -> None:
        data = _blob(MiB, seed=57)
        info = await blobs.put_bytes(data)
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    # A caller that sees a size it cannot take closes the body unread.
                    for _ in range(40):
                        blob = await client.open_blob(info.digest)
                        await _close_iterator(blob.body)
                    assert await client.request(b"ok", timeout=10) == b"re:ok"
                    assert await _read((await client.open_blob(info.digest)).body) == data

    @pytest.mark.parametrize("offset", [0, 5, 300_000])
    async def test_blob_served_from_a_file(
        self, transport_pair: TransportPair, tmp_path: Any, offset: int
    ) -> None:
        # A node that may send a blob with zero copy gives its path as well as a
        # body; a transport may send either, from ``offset``.
        import anyio

        data = _blob(300_000, seed=58)
        digest = Digest.of(data)
        path = anyio.Path(str(tmp_path)) / "blob"
        await path.write_bytes(data)

        async def body(start: int) -> AsyncIterator[bytes]:
            for pos in range(start, len(data), 65_536):
                yield data[pos : pos + 65_536]

        async def source(wanted: Digest, start: int) -> PeerBlob | None:
            if wanted != digest or not 0 <= start <= len(data):
                return None
            return PeerBlob(len(data), start, body(start), str(path))

        with _deadline():
            async with transport_pair.serve(_echo, source) as address:
                async with await transport_pair.transport.connect(address) as client:
                    got = await _read(client.fetch_blob(digest, offset=offset))
                    assert got == data[offset:]
                    blob = await client.open_blob(digest, offset=offset)
                    assert await _read(blob.body) == data[offset:]

    async def test_concurrent_fetches_and_requests(
        self, transport_pair: TransportPair, blobs: BlobStore
    ) -> None:
        import anyio

        datas = [_blob(300_000 + n, seed=60 + n) for n in range(6)]
        infos = [await blobs.put_bytes(d) for d in datas]
        fetched: dict[int, bytes] = {}
        replies: list[bytes] = []
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:

                    async def fetch(n: int) -> None:
                        fetched[n] = await _read(client.fetch_blob(infos[n].digest))

                    async def ask(n: int) -> None:
                        replies.append(await client.request(b"%d" % n, timeout=30))

                    async with anyio.create_task_group() as tg:
                        for n in range(len(datas)):
                            tg.start_soon(fetch, n)
                            tg.start_soon(ask, n)
        assert fetched == dict(enumerate(datas))
        assert sorted(replies) == sorted(b"re:%d" % n for n in range(len(datas)))

    async def test_abandoned_fetches(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        data = _blob(4 * MiB, seed=54)
        info = await blobs.put_bytes(data)
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    # Abandoned streams must not leak connections (a pool would run dry).
                    for _ in range(24):
                        chunks = client.fetch_blob(info.digest)
                        first = await chunks.__anext__()
                        assert first == data[: len(first)]
                        await _close_iterator(chunks)
                    assert await client.request(b"ok", timeout=10) == b"re:ok"
                    assert await _read(client.fetch_blob(info.digest)) == data

    async def test_unstarted_fetches_can_be_closed(
        self, transport_pair: TransportPair, blobs: BlobStore
    ) -> None:
        data = _blob(MiB, seed=55)
        info = await blobs.put_bytes(data)
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                async with await transport_pair.transport.connect(address) as client:
                    # Closed before the first chunk: nothing may stay open either.
                    for _ in range(40):
                        await _close_iterator(client.fetch_blob(info.digest))
                    assert await client.request(b"ok", timeout=10) == b"re:ok"
                    assert await _read(client.fetch_blob(info.digest)) == data

    # -- failures and lifecycle

    async def test_connect_to_unserved_address(self, transport_pair: TransportPair) -> None:
        # A transport may connect lazily: the error may come from connect() or
        # from the first request, but it must come, and be a TransportError.
        with _deadline(), pytest.raises(TransportError):
            client = await transport_pair.transport.connect(transport_pair.unserved)
            try:
                await client.request(b"hello", timeout=10)
            finally:
                await client.aclose()

    async def test_peer_that_stopped(self, transport_pair: TransportPair, blobs: BlobStore) -> None:
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                client = await transport_pair.transport.connect(address)
                assert await client.request(b"a", timeout=10) == b"re:a"
            try:
                with pytest.raises(TransportError):
                    await client.request(b"b", timeout=10)
            finally:
                await client.aclose()

    async def test_aclose_is_idempotent(
        self, transport_pair: TransportPair, blobs: BlobStore
    ) -> None:
        transport = transport_pair.transport
        with _deadline():
            async with transport_pair.serve(_echo, store_blob_source(blobs)) as address:
                client = await transport.connect(address)
                assert await client.request(b"a", timeout=10) == b"re:a"
                await client.aclose()
                await client.aclose()
                assert client.closed
                with pytest.raises(PyrsiaError):
                    await client.request(b"b", timeout=10)
                other = await transport.connect(address)
                assert await other.request(b"c", timeout=10) == b"re:c"
                await transport.aclose()
                await transport.aclose()
                assert transport.closed
                with pytest.raises(PyrsiaError):
                    await transport.connect(address)
                await other.aclose()


# --------------------------------------------------------------------------- upstreams


async def _drain(response: UpstreamResponse) -> bytes:
    return b"".join([chunk async for chunk in response.body])


class UpstreamConformance:
    """The contract of :class:`~pyrsia_core.interfaces.Upstream`, as pytest tests.

    Subclass it and override three fixtures: ``upstream`` (a fresh, open
    upstream), ``known`` (``(locator, expected bytes)`` pairs it serves) and
    ``missing`` (a locator it does not have); override ``accept`` to pass
    ``accept=`` to every ``open``::

        class TestMyUpstream(UpstreamConformance):
            @pytest.fixture
            async def upstream(self, my_server):
                async with MyUpstream(my_server.url) as upstream:
                    yield upstream

            @pytest.fixture
            def known(self, my_server):
                return [("pkg/1.0/file.tar", my_server.content["file.tar"])]

            @pytest.fixture
            def missing(self):
                return "pkg/1.0/nothing-here"

    Responses may leave ``size`` and ``digest`` unset; when set they must be
    right. A missing locator raises a :class:`~pyrsia_core.errors.PyrsiaError`
    that is also a ``LookupError``.
    """

    pytestmark: ClassVar[Any] = [pytest.mark.anyio]

    @pytest.fixture
    def upstream(self) -> Upstream:
        raise NotImplementedError(f"{type(self).__name__} must override the 'upstream' fixture")

    @pytest.fixture
    def known(self) -> Sequence[tuple[str, bytes]]:
        raise NotImplementedError(f"{type(self).__name__} must override the 'known' fixture")

    @pytest.fixture
    def missing(self) -> str:
        raise NotImplementedError(f"{type(self).__name__} must override the 'missing' fixture")

    @pytest.fixture
    def accept(self) -> Sequence[str]:
        """The ``accept`` argument of every ``open`` (none by default)."""
        return ()

    async def test_known_round_trip(
        self, upstream: Upstream, known: Sequence[tuple[str, bytes]], accept: Sequence[str]
    ) -> None:
        assert known, "the 'known' fixture must list at least one locator"
        with _deadline(60):
            for locator, expected in known:
                response = await upstream.open(locator, accept=accept)
                assert isinstance(response, UpstreamResponse)
                assert isinstance(response.media_type, str)
                assert response.media_type, f"{locator}: empty media type"
                chunks = [chunk async for chunk in response.body]
                assert all(isinstance(chunk, bytes) for chunk in chunks)
                assert b"".join(chunks) == expected, f"{locator}: wrong bytes"

    async def test_digest_and_size(
        self, upstream: Upstream, known: Sequence[tuple[str, bytes]], accept: Sequence[str]
    ) -> None:
        with _deadline(60):
            for locator, expected in known:
                response = await upstream.open(locator, accept=accept)
                await _drain(response)
                if response.digest is not None:
                    assert isinstance(response.digest, Digest)
                    assert response.digest == Digest.of(expected), f"{locator}: wrong digest"
                if response.size is not None:
                    assert response.size == len(expected), f"{locator}: wrong size"

    async def test_missing_is_lookup_error(
        self, upstream: Upstream, missing: str, accept: Sequence[str]
    ) -> None:
        with _deadline(), pytest.raises(LookupError) as info:
            await _drain(await upstream.open(missing, accept=accept))
        assert isinstance(info.value, PyrsiaError), (
            f"{type(info.value).__name__} is a LookupError but not a PyrsiaError"
        )

    async def test_concurrent_opens(
        self, upstream: Upstream, known: Sequence[tuple[str, bytes]], accept: Sequence[str]
    ) -> None:
        import anyio

        got: dict[int, bytes] = {}

        async def one(n: int, locator: str) -> None:
            got[n] = await _drain(await upstream.open(locator, accept=accept))

        with _deadline(60):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    for n, (locator, _) in enumerate(known):
                        tg.start_soon(one, n, locator)
        assert got == {n: expected for n, (_, expected) in enumerate(known)}

    async def test_abandoned_bodies(
        self, upstream: Upstream, known: Sequence[tuple[str, bytes]], accept: Sequence[str]
    ) -> None:
        locator, expected = max(known, key=lambda pair: len(pair[1]))
        with _deadline(60):
            # Bodies closed after one chunk must not leak connections.
            for _ in range(40):
                response = await upstream.open(locator, accept=accept)
                async for chunk in response.body:
                    assert expected.startswith(chunk)
                    break
                await _close_iterator(response.body)
            assert await _drain(await upstream.open(locator, accept=accept)) == expected

    async def test_unstarted_bodies_can_be_closed(
        self, upstream: Upstream, known: Sequence[tuple[str, bytes]], accept: Sequence[str]
    ) -> None:
        locator, expected = max(known, key=lambda pair: len(pair[1]))
        with _deadline(60):
            # A caller that decides not to read (say, the digest is already
            # stored) closes the body before its first chunk: that must release
            # the response too. (An async generator's ``aclose()`` before the
            # first ``__anext__`` runs none of its code, not even ``finally``.)
            for _ in range(40):
                response = await upstream.open(locator, accept=accept)
                await _close_iterator(response.body)
            assert await _drain(await upstream.open(locator, accept=accept)) == expected

    async def test_closed_upstream_raises(
        self, upstream: Upstream, known: Sequence[tuple[str, bytes]], accept: Sequence[str]
    ) -> None:
        locator, _ = known[0]
        await upstream.aclose()
        assert upstream.closed
        with _deadline(), pytest.raises(PyrsiaError):
            await _drain(await upstream.open(locator, accept=accept))

    async def test_aclose_is_idempotent(
        self, upstream: Upstream, known: Sequence[tuple[str, bytes]], accept: Sequence[str]
    ) -> None:
        locator, expected = known[0]
        async with upstream as same:
            assert same is upstream
            assert await _drain(await upstream.open(locator, accept=accept)) == expected
        assert upstream.closed
        await upstream.aclose()
        await upstream.aclose()
        assert upstream.closed


# --------------------------------------------------------------------------- package types

#: Contents no package type accepts (override ``garbage`` to add more).
_GARBAGE: Final = (
    b"",
    b" ",
    b"\x00" * 64,
    b"\xff\xfe\xfd\xfc",
    b"{",
    b'{"a":',
    b"]",
    b"not a manifest",
    b"<html><body>502 Bad Gateway</body></html>",
)

#: Nesting deep enough to overflow a naive recursive parser.
_DEEP: Final = (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000)

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)


def _json_values(strings: Sequence[str]) -> st.SearchStrategy[Any]:
    leaves = _json_scalars | st.sampled_from(strings) if strings else _json_scalars
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.sampled_from(strings) | st.text(max_size=8), children, max_size=4)
            if strings
            else st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=8,
    )


def _json_docs(samples: Sequence[tuple[bytes, str, Sequence[Digest | str]]]) -> list[Any]:
    docs = []
    for content, _, _ in samples:
        try:
            docs.append(json.loads(content))
        except (ValueError, RecursionError):
            continue
    return docs


def _strings_in(value: Any, out: set[str]) -> None:
    if isinstance(value, str):
        out.add(value)
    elif isinstance(value, list):
        for item in value:
            _strings_in(item, out)
    elif isinstance(value, dict):
        for key, item in value.items():
            out.add(key)
            _strings_in(item, out)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (dict keys and list indexes) into a JSON value, the root included."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def _mutate(doc: Any, path: tuple[Any, ...], new: Any, delete: bool) -> Any:
    """A copy of ``doc`` with the value at ``path`` replaced by ``new`` (or deleted)."""
    if not path:
        return new
    copy = json.loads(json.dumps(doc))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return copy


def _check_references(package_type: PackageType, content: bytes, media_type: str) -> None:
    """``references`` returns ``[(Digest, str), ...]`` or raises a ``ValueError``."""
    try:
        refs = package_type.references(content, media_type)
    except ValueError:
        return
    except Exception as exc:
        pytest.fail(
            f"references() raised {type(exc).__name__}, not a ValueError, for "
            f"{content[:120]!r} ({media_type}): {exc}"
        )
    assert isinstance(refs, list)
    for ref in refs:
        assert isinstance(ref, tuple) and len(ref) == 2
        assert isinstance(ref[0], Digest) and isinstance(ref[1], str)


#: Every subclass runs the same ``@given`` methods (hence ``differing_executors``);
#: without an example database that is harmless.
_FUZZ_SETTINGS: Final = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.differing_executors,
    ],
)


class MemoryPackageHost(PackageHost):
    """A :class:`PackageHost` in memory: a log of artifacts, builds run in-line.

    For testing a package type's app without a node: ``build`` runs the package
    type's checked :meth:`~PackageType.build` and "commits" its artifacts here.
    """

    def __init__(self, package_type: PackageType, *, build_node: bool = True) -> None:
        self.package_type = package_type
        self.build_node = build_node
        self.log: dict[str, list[LoggedArtifact]] = {}
        self.blobs: dict[Digest, bytes] = {}
        self.builds: list[str] = []

    @property
    def node_id(self) -> str:
        return "0" * 64

    @property
    def is_build_node(self) -> bool:
        return self.build_node

    async def artifacts(self, package_id: str) -> list[LoggedArtifact]:
        return list(self.log.get(package_id, []))

    async def package_ids(self, prefix: str) -> list[str]:
        return sorted(p for p in self.log if p.startswith(prefix))

    async def artifacts_with_digest(self, digest: Digest) -> list[LoggedArtifact]:
        return [a for arts in self.log.values() for a in arts if a.digest == digest]

    async def open_artifact(self, artifact: LoggedArtifact) -> VerifiedBlob:
        if artifact not in self.log.get(artifact.package_id, []):
            raise ArtifactUnavailable(f"{artifact.artifact_id!r} is not in the log")
        data = self.blobs.get(artifact.digest)
        if data is None or Digest.of(data) != artifact.digest:
            raise ArtifactUnavailable(f"{artifact.artifact_id!r} is not available")
        return memory_blob(data)

    async def build(self, package_id: str, *, artifact_ids: Sequence[str] = ()) -> BuildInfo:
        package_id = self.package_type.parse_package_id(package_id)
        logged = {a.artifact_id: a for a in self.log.get(package_id, [])}
        if logged and all(a in logged for a in artifact_ids):
            return BuildInfo("", package_id, "EXISTS")
        if not self.build_node:
            return BuildInfo("", package_id, "REQUESTED")
        self.builds.append(package_id)
        build_id = str(len(self.builds))
        sink = MemorySink()
        try:
            built = await self.package_type.build(package_id, artifact_ids=artifact_ids,
                                                  sink=sink)
        except ArtifactUnavailable as exc:
            return BuildInfo(build_id, package_id, "NOT_FOUND", str(exc))
        except PyrsiaError as exc:
            return BuildInfo(build_id, package_id, "FAILED", str(exc))
        new = [item for item in built if item.artifact_id not in logged]
        for item in new:
            self.blobs[item.digest] = item.data if item.data is not None else sink.blobs[
                item.digest]
            logged[item.artifact_id] = LoggedArtifact(package_id, item.artifact_id, item.digest,
                                                      0, len(new))
        self.log[package_id] = list(logged.values())
        return BuildInfo(build_id, package_id, "SUCCESS")


async def asgi_request(
    app: ASGIApp, method: str, path: str, *, root_path: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """Call an ASGI app once, in-line: ``(status, headers, body)``."""
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": root_path, "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    assert sent and sent[0]["type"] == "http.response.start", f"no response start: {sent!r:.300}"
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")
    headers = {k.decode().lower(): v.decode() for k, v in sent[0].get("headers", [])}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], headers, body


class PackageTypeConformance:
    """The contract of :class:`~pyrsia_core.interfaces.PackageType`, as pytest tests.

    Subclass it and override four fixtures: ``package_type`` (an instance),
    ``valid_ids`` and ``invalid_ids`` (package ids ``parse_package_id`` accepts
    and refuses), and ``samples``: ``(content, media type, expected reference
    digests in order)`` for real artifacts of the type::

        class TestMyPackageType(PackageTypeConformance):
            @pytest.fixture
            def package_type(self):
                return MyPackageType()

            @pytest.fixture
            def valid_ids(self):
                return ["org.example:lib:1.0"]

            @pytest.fixture
            def invalid_ids(self):
                return ["", "no version", "a:b:c:d:e"]

            @pytest.fixture
            def samples(self):
                return [(POM_BYTES, "application/xml", ["sha256:..."])]

    The tests are synchronous (package types are pure). Malformed ids and
    malformed content must raise ``ValueError`` subclasses -- never
    ``KeyError``, ``TypeError``, ``RecursionError`` and the like -- so callers
    can treat "bad input" as one case; hypothesis fuzzes both. ``garbage``
    (contents no type accepts) may be overridden to add type-specific cases.
    """

    @pytest.fixture
    def package_type(self) -> PackageType:
        raise NotImplementedError(f"{type(self).__name__} must override the 'package_type' fixture")

    @pytest.fixture
    def valid_ids(self) -> Sequence[str]:
        raise NotImplementedError(f"{type(self).__name__} must override the 'valid_ids' fixture")

    @pytest.fixture
    def invalid_ids(self) -> Sequence[str]:
        raise NotImplementedError(f"{type(self).__name__} must override the 'invalid_ids' fixture")

    @pytest.fixture
    def samples(self) -> Sequence[tuple[bytes, str, Sequence[Digest | str]]]:
        raise NotImplementedError(f"{type(self).__name__} must override the 'samples' fixture")

    @pytest.fixture
    def garbage(self) -> Sequence[bytes]:
        return _GARBAGE

    @pytest.fixture
    def builds(self) -> Sequence[tuple[str, Mapping[str, Digest | str]]]:
        """``(package id, {artifact id: digest})`` a building package type must produce."""
        return ()

    @pytest.fixture
    def missing_packages(self) -> Sequence[str]:
        """Valid package ids the upstream does not have (``ArtifactUnavailable``)."""
        return ()

    @pytest.fixture
    def requests(self) -> Sequence[tuple[str, str, int, bytes | None]]:
        """``(method, path, status, body or None)`` the type's app (if any) must answer,
        with a :class:`MemoryPackageHost` that builds on a miss; paths include the mount."""
        return ()

    @pytest.fixture
    def media_types(
        self, samples: Sequence[tuple[bytes, str, Sequence[Digest | str]]]
    ) -> list[str]:
        """The media types garbage is offered under: the samples' and a generic one."""
        return sorted({media_type for _, media_type, _ in samples} | {"application/octet-stream"})

    # -- names and ids

    def test_names(self, package_type: PackageType) -> None:
        for attr in ("name", "record_type"):
            value = getattr(package_type, attr)
            assert isinstance(value, str) and value, f"{attr} must be a non-empty string"
            assert value == value.strip()

    def test_valid_ids(self, package_type: PackageType, valid_ids: Sequence[str]) -> None:
        assert valid_ids, "the 'valid_ids' fixture must list at least one id"
        for text in valid_ids:
            normal = package_type.parse_package_id(text)
            assert isinstance(normal, str) and normal, f"{text!r} -> {normal!r}"
            # Normalising is idempotent: a normalised id parses to itself.
            assert package_type.parse_package_id(normal) == normal

    def test_invalid_ids(self, package_type: PackageType, invalid_ids: Sequence[str]) -> None:
        assert invalid_ids, "the 'invalid_ids' fixture must list at least one id"
        for text in invalid_ids:
            with pytest.raises(ValueError):
                package_type.parse_package_id(text)

    @given(text=st.text(max_size=300))
    @_FUZZ_SETTINGS
    def test_fuzz_ids(self, package_type: PackageType, text: str) -> None:
        try:
            normal = package_type.parse_package_id(text)
        except ValueError:
            return
        except Exception as exc:
            pytest.fail(f"parse_package_id({text!r}) raised {type(exc).__name__}: {exc}")
        assert isinstance(normal, str) and normal

    # -- serving and building

    def test_serving_contract(self, package_type: PackageType) -> None:
        mount, param = package_type.mount_path, package_type.id_param
        assert isinstance(mount, str) and isinstance(param, str)
        assert param.isidentifier(), "id_param names an API/CLI parameter"
        host = MemoryPackageHost(package_type)
        app = package_type.asgi_app(host)
        if mount:
            assert mount.startswith("/") and mount != "/" and not mount.endswith("/")
            assert not mount.startswith(("/api", "/p2p")), "reserved by the node"
            assert callable(app), "a package type with a mount_path serves an ASGI app"
        else:
            assert app is None, "an app needs a mount_path"

    @pytest.mark.anyio
    async def test_build(
        self,
        package_type: PackageType,
        builds: Sequence[tuple[str, Mapping[str, Digest | str]]],
        missing_packages: Sequence[str],
        valid_ids: Sequence[str],
    ) -> None:
        if not package_type.can_build:
            assert not builds, "the 'builds' fixture lists builds, but _build is not overridden"
            with pytest.raises(UsageError):
                await package_type.build(valid_ids[0])
            return
        assert builds, "a package type that builds needs the 'builds' fixture"
        for package_id, expected in builds:
            first = await package_type.build(package_id)
            assert all(isinstance(item, BuiltArtifact) for item in first)
            want = {aid: d if isinstance(d, Digest) else Digest.parse(d)
                    for aid, d in expected.items()}
            assert {item.artifact_id: item.digest for item in first} == want
            for item in first:
                assert item.data is not None and Digest.of(item.data) == item.digest
            # Deterministic: validators rebuild and must get the same set -- through a
            # sink, as a node builds: what is not carried as bytes was streamed into it.
            sink = MemorySink()
            again = await package_type.build(package_id, sink=sink)
            assert {(i.artifact_id, i.digest) for i in again} == {
                (i.artifact_id, i.digest) for i in first}
            for item in again:
                assert item.size is not None
                if item.data is None:
                    assert item.digest in sink.blobs, f"{item.artifact_id} was not streamed"
                    assert len(sink.blobs[item.digest]) == item.size
                else:
                    assert Digest.of(item.data) == item.digest
        for package_id in missing_packages:
            with pytest.raises(ArtifactUnavailable):
                await package_type.build(package_id)
        with pytest.raises(ValueError):
            await package_type.build("")

    @pytest.mark.anyio
    async def test_requests(
        self,
        package_type: PackageType,
        requests: Sequence[tuple[str, str, int, bytes | None]],
    ) -> None:
        host = MemoryPackageHost(package_type)
        app = package_type.asgi_app(host)
        if app is None:
            assert not requests, "the 'requests' fixture lists requests, but there is no app"
            return
        for method, path, status, body in requests:
            got_status, _, got_body = await asgi_request(
                app, method, path, root_path=package_type.mount_path)
            assert got_status == status, (method, path, got_status, got_body[:300])
            if body is not None:
                assert got_body == body, (method, path)
            if method == "HEAD":
                assert got_body == b""

    # -- references

    def test_references(
        self,
        package_type: PackageType,
        samples: Sequence[tuple[bytes, str, Sequence[Digest | str]]],
    ) -> None:
        assert samples, "the 'samples' fixture must list at least one artifact"
        for content, media_type, expected in samples:
            refs = package_type.references(content, media_type)
            assert isinstance(refs, list)
            want = [d if isinstance(d, Digest) else Digest.parse(d) for d in expected]
            assert [digest for digest, _ in refs] == want
            for digest, ref_type in refs:
                assert isinstance(digest, Digest)
                assert isinstance(ref_type, str) and ref_type, "references need a media type"
            assert package_type.references(content, media_type) == refs  # pure

    def test_garbage_is_value_error(
        self, package_type: PackageType, garbage: Sequence[bytes], media_types: list[str]
    ) -> None:
        for content in garbage:
            for media_type in media_types:
                try:
                    package_type.references(content, media_type)
                except ValueError:
                    continue
                except Exception as exc:
                    pytest.fail(
                        f"references({content[:60]!r}, {media_type!r}) raised "
                        f"{type(exc).__name__}, not a ValueError: {exc}"
                    )
                pytest.fail(f"references({content[:60]!r}, {media_type!r}) accepted garbage")

    def test_truncated_samples_are_value_error(
        self,
        package_type: PackageType,
        samples: Sequence[tuple[bytes, str, Sequence[Digest | str]]],
    ) -> None:
        for content, media_type, _ in samples:
            for end in (1, len(content) // 2, len(content) - 1):
                if 0 < end < len(content):
                    with pytest.raises(ValueError):
                        package_type.references(content[:end], media_type)

    def test_deeply_nested_content_is_value_error(
        self, package_type: PackageType, media_types: list[str]
    ) -> None:
        for content in _DEEP:
            for media_type in media_types:
                with pytest.raises(ValueError):
                    package_type.references(content, media_type)

    @given(data=st.data())
    @_FUZZ_SETTINGS
    def test_fuzz_random_bytes(
        self, package_type: PackageType, media_types: list[str], data: st.DataObject
    ) -> None:
        content = data.draw(st.binary(max_size=512), label="content")
        media_type = data.draw(st.sampled_from(media_types), label="media_type")
        _check_references(package_type, content, media_type)

    @given(data=st.data())
    @_FUZZ_SETTINGS
    def test_fuzz_mutated_samples(
        self,
        package_type: PackageType,
        samples: Sequence[tuple[bytes, str, Sequence[Digest | str]]],
        data: st.DataObject,
    ) -> None:
        index = data.draw(st.integers(0, len(samples) - 1), label="sample")
        content, media_type, _ = samples[index]
        docs = _json_docs([samples[index]])
        if docs:
            # JSON artifacts: change or delete one value anywhere in the document.
            doc = docs[0]
            strings: set[str] = set()
            _strings_in(doc, strings)
            path = data.draw(st.sampled_from(_paths(doc)), label="path")
            delete = bool(path) and data.draw(st.booleans(), label="delete")
            new = None if delete else data.draw(_json_values(sorted(strings)), label="new")
            content = json.dumps(_mutate(doc, path, new, delete)).encode()
        else:
            # Other artifacts: overwrite a few bytes.
            raw = bytearray(content)
            for _ in range(data.draw(st.integers(1, 4), label="flips")):
                if raw:
                    raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
            content = bytes(raw)
        _check_references(package_type, content, media_type)
