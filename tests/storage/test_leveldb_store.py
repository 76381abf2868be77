"""The LevelDB key/value store: conformance with persistence, locking, big scans."""

from __future__ import annotations

import gc
import signal
import sys
import time
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from importlib.metadata import entry_points
from pathlib import Path

import anyio
import pytest
from pyrsia_core.errors import StoreError, StoreLocked, UsageError
from pyrsia_core.interfaces import KeyValueStore
from pyrsia_core.testing.conformance import KeyValueStoreConformance
from pyrsia_storage_leveldb import LevelDBStore

from pyrsia_core import plugins

pytestmark = pytest.mark.anyio


class TestLevelDBConformance(KeyValueStoreConformance):
    persistent = True

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[LevelDBStore]:
        async with LevelDBStore(tmp_path / "db") as store:
            yield store

    @pytest.fixture
    def reopen(self, tmp_path: Path) -> Callable[[], Awaitable[KeyValueStore]]:
        return lambda: LevelDBStore.open(tmp_path / "db")


class TestLevelDBSmallChunks(KeyValueStoreConformance):
    """Scans that cross many chunk boundaries (3 pairs per worker-thread hop)."""

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[LevelDBStore]:
        async with LevelDBStore(tmp_path / "db", sync=False, scan_chunk=3) as store:
            yield store


# --------------------------------------------------------------------------- config


def test_from_config_and_entry_point(tmp_path: Path) -> None:
    (ep,) = [ep for ep in entry_points(group="pyrsia.kv_store") if ep.name == "leveldb"][:1]
    assert ep.value == "pyrsia_storage_leveldb:LevelDBStore.from_config"
    store = plugins.create("pyrsia.kv_store", "leveldb", {"path": str(tmp_path / "db")})
    assert isinstance(store, LevelDBStore)
    assert (store.path, store.sync) == (tmp_path / "db", True)
    assert not (tmp_path / "db").exists()  # the factory does no I/O
    assert LevelDBStore.from_config({"path": "x", "sync": "false"}).sync is False
    with pytest.raises(UsageError, match="path"):
        LevelDBStore.from_config({"sync": "true"})
    with pytest.raises(UsageError, match="sync"):
        LevelDBStore.from_config({"path": "x", "sync": "maybe"})


# --------------------------------------------------------------------------- locking

_HOLD_OPEN = """
import sys, anyio
from pyrsia_storage_leveldb import LevelDBStore

async def main():
    async with LevelDBStore(sys.argv[1]) as store:
        await store.put(b"owner", b"child")
        print("OPEN", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


async def test_second_store_in_process_is_refused(tmp_path: Path) -> None:
    async with LevelDBStore(tmp_path / "db") as first:
        await first.put(b"k", b"v")
        with pytest.raises(StoreLocked, match="already open in this process"):
            await LevelDBStore.open(tmp_path / "db")
        # The same directory through another spelling of its path.
        with pytest.raises(StoreLocked):
            await LevelDBStore.open(tmp_path / "x" / ".." / "db")
    async with LevelDBStore(tmp_path / "db") as again:  # free once closed
        assert await again.get(b"k") == b"v"


async def test_dropped_store_frees_the_path(tmp_path: Path) -> None:
    store = await LevelDBStore.open(tmp_path / "db")
    await store.put(b"k", b"v")
    del store
    gc.collect()
    async with LevelDBStore(tmp_path / "db") as again:
        assert await again.get(b"k") == b"v"


async def test_directory_locked_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "db"
    process = await anyio.open_process([sys.executable, "-c", _HOLD_OPEN, str(path)])
    try:
        assert process.stdout is not None
        line = b""
        with anyio.fail_after(20):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive(1)
        assert line.strip() == b"OPEN"
        with pytest.raises(StoreLocked) as caught:
            await LevelDBStore(path).get(b"owner")
        message = str(caught.value)
        assert str(path) in message
        assert "another pyrsia node is probably using it" in message
        # The failed open left nothing registered in this process.
        with pytest.raises(StoreLocked, match="another process"):
            await LevelDBStore.open(path)
    finally:
        process.send_signal(signal.SIGKILL)
        with anyio.fail_after(10):
            await process.wait()
        await process.aclose()
    async with LevelDBStore(path) as store:  # LevelDB's lock dies with the process
        assert await store.get(b"owner") == b"child"


async def test_plyvel_errors_are_mapped(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError) as caught:
        await LevelDBStore.open(tmp_path / "file" / "db")
    assert not type(caught.value).__module__.startswith("plyvel")
    # plyvel.IOError about the LOCK file that is not a lock conflict.
    with pytest.raises(StoreError) as caught:
        await LevelDBStore.open(tmp_path / "file")
    assert not isinstance(caught.value, StoreLocked)
    assert "plyvel" in type(caught.value.__cause__).__module__
    corrupt = tmp_path / "corrupt"
    async with LevelDBStore(corrupt) as store:
        await store.put(b"k", b"v")
    (corrupt / "CURRENT").write_text("MANIFEST-999999\n")  # points at a missing manifest
    with pytest.raises(StoreError):
        await LevelDBStore.open(corrupt)
    async with LevelDBStore(tmp_path / "fine"):  # nothing stayed registered
        pass


# --------------------------------------------------------------------------- big scans


async def test_scan_of_a_million_keys_streams(tmp_path: Path) -> None:
    count = 1_000_000
    async with LevelDBStore(tmp_path / "db", sync=False) as store:
        for base in range(0, count, 100_000):
            async with store.batch() as batch:
                for i in range(base, base + 100_000):
                    batch.put(b"r/%08d" % i, b"")

        longest_gap = 0.0
        done = False

        async def ticker() -> None:
            nonlocal longest_gap
            last = time.perf_counter()
            while not done:
                await anyio.sleep(0.001)
                now = time.perf_counter()
                longest_gap = max(longest_gap, now - last)
                last = now

        seen = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.sleep(0.01)
            async for key, _ in store.scan(b"r/"):
                assert key == b"r/%08d" % seen
                seen += 1
            done = True
        assert seen == count
        # One hop reads 512 small pairs, far below a millisecond.
        assert longest_gap < 0.25, f"the event loop stalled for {longest_gap:.3f} s"

        # Memory, traced over the first 100,000 pairs (tracemalloc slows a scan
        # tenfold): what one hop holds, a few hundred KiB; not what 100,000 take.
        tracemalloc.start()
        try:
            base_memory, _ = tracemalloc.get_traced_memory()
            scan = store.scan(b"r/", reverse=True)
            assert isinstance(scan, AsyncGenerator)
            async with aclosing(scan):
                async for key, _ in scan:
                    seen -= 1
                    assert key == b"r/%08d" % seen
                    if seen == count - 100_000:
                        break
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - base_memory < 4 << 20, f"scan held {(peak - base_memory) >> 20} MiB"
