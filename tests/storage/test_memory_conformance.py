"""The in-memory stores of ``pyrsia_core.testing`` against the conformance suites."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import entry_points

import pytest
from pyrsia_core.errors import UsageError
from pyrsia_core.interfaces import KeyValueStore
from pyrsia_core.testing import FakeClock, MemoryBlobStore, MemoryKeyValueStore
from pyrsia_core.testing.conformance import BlobStoreConformance, KeyValueStoreConformance

from pyrsia_core import Digest


class TestMemoryBlobStore(BlobStoreConformance):
    @pytest.fixture
    async def store(self) -> AsyncIterator[MemoryBlobStore]:
        async with MemoryBlobStore() as store:
            yield store


class TestMemoryKeyValueStore(KeyValueStoreConformance):
    @pytest.fixture
    async def store(self) -> AsyncIterator[MemoryKeyValueStore]:
        async with MemoryKeyValueStore() as store:
            yield store


class TestReopenedMemoryKeyValueStore(KeyValueStoreConformance):
    """``reopen()`` shares the data, which also exercises the suite's persistence tests."""

    persistent = True

    @pytest.fixture
    async def store(self) -> AsyncIterator[MemoryKeyValueStore]:
        async with MemoryKeyValueStore() as store:
            yield store

    @pytest.fixture
    def reopen(self, store: MemoryKeyValueStore) -> Callable[[], Awaitable[KeyValueStore]]:
        async def again() -> KeyValueStore:
            return store.reopen()

        return again


def test_persistence_tests_follow_the_class_attribute() -> None:
    assert TestMemoryKeyValueStore.test_reopen_keeps_writes is None
    assert callable(TestReopenedMemoryKeyValueStore.test_reopen_keeps_writes)

    class Again(TestReopenedMemoryKeyValueStore):
        persistent = False

    class AndBack(Again):
        persistent = True

    assert Again.test_reopen_keeps_writes is None
    assert callable(AndBack.test_reopen_keeps_writes)


def test_from_config() -> None:
    assert MemoryBlobStore.from_config({}).quota is None
    assert MemoryBlobStore.from_config({"quota_bytes": "1000", "other": "x"}).quota == 1000
    for bad in ("ten", "-1", "1.5"):
        with pytest.raises(UsageError):
            MemoryBlobStore.from_config({"quota_bytes": bad})
    assert isinstance(MemoryKeyValueStore.from_config({"anything": "x"}), MemoryKeyValueStore)


def test_entry_points() -> None:
    for group, cls in [
        ("pyrsia.blob_store", MemoryBlobStore),
        ("pyrsia.kv_store", MemoryKeyValueStore),
    ]:
        (ep,) = [ep for ep in entry_points(group=group, name="memory")][:1]
        assert isinstance(ep.load()({}), cls)


def test_testing_package_is_pure() -> None:
    # Interpreter start-up (site, .pth files) may load some of these already:
    # only what importing the package adds counts.
    code = (
        "import sys; before = set(sys.modules); import pyrsia_core.testing; "
        "bad = {'anyio', 'asyncio', 'trio', 'socket', 'pathlib', 'pytest', 'hypothesis'} "
        "& (set(sys.modules) - before); print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.anyio
async def test_memory_lru_order() -> None:
    store = MemoryBlobStore()
    a = await store.put_bytes(b"a")
    b = await store.put_bytes(b"b")
    assert [d async for d in store.lru_digests()] == [a.digest, b.digest]
    assert await store.touch(a.digest) is True
    assert await store.touch(Digest.of(b"c")) is False
    assert [d async for d in store.lru_digests()] == [b.digest, a.digest]


def test_fake_clock() -> None:
    clock = FakeClock(now=100.0, monotonic=5.0)
    assert (clock.now(), clock.monotonic()) == (100.0, 5.0)
    clock.advance(2.5)
    assert (clock.now(), clock.monotonic()) == (102.5, 7.5)
    clock.set_now(50.0)  # wall clocks may jump back
    assert clock.now() == 50.0
    clock.set_monotonic(8.0)
    with pytest.raises(ValueError):
        clock.set_monotonic(1.0)
    with pytest.raises(ValueError):
        clock.advance(-1)
    assert FakeClock().now() == 1_700_000_000.0
