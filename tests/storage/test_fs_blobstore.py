"""The filesystem blob store: conformance, crash safety, locking and flat memory."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import tracemalloc
from collections.abc import AsyncIterator
from importlib.metadata import entry_points
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from pyrsia_core.errors import (
    BlobNotFound,
    DigestMismatch,
    QuotaExceeded,
    StoreLocked,
    UsageError,
)
from pyrsia_core.testing.conformance import BlobStoreConformance
from pyrsia_storage_fs import FsBlobStore

from pyrsia_core import Digest, plugins

pytestmark = pytest.mark.anyio

MiB = 1 << 20


class TestFsBlobStoreConformance(BlobStoreConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[FsBlobStore]:
        async with FsBlobStore(tmp_path / "blobs") as store:
            yield store


# --------------------------------------------------------------------------- helpers


async def _chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for pos in range(0, len(data), size):
        yield data[pos : pos + size]


def _temp_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


async def _read_line(process: Process) -> str:
    assert process.stdout is not None
    line = b""
    with anyio.fail_after(20):
        while not line.endswith(b"\n"):
            line += await process.stdout.receive(1)
    return line.decode().strip()


async def _start(code: str, *args: str) -> Process:
    return await anyio.open_process([sys.executable, "-c", code, *args])


async def _kill(process: Process) -> None:
    process.send_signal(signal.SIGKILL)
    with anyio.fail_after(10):
        await process.wait()
    await process.aclose()


# --------------------------------------------------------------------------- config and layout


def test_from_config_and_entry_point(tmp_path: Path) -> None:
    (ep,) = [ep for ep in entry_points(group="pyrsia.blob_store") if ep.name == "fs"][:1]
    assert ep.value == "pyrsia_storage_fs:FsBlobStore.from_config"
    store = plugins.create("pyrsia.blob_store", "fs", {"path": str(tmp_path), "other": "x"})
    assert isinstance(store, FsBlobStore)
    assert (store.root, store.quota) == (tmp_path, None)
    assert FsBlobStore.from_config({"path": str(tmp_path), "quota_bytes": "4096"}).quota == 4096
    with pytest.raises(UsageError, match="path"):
        FsBlobStore.from_config({})
    for bad in ("lots", "-5", "1e9"):
        with pytest.raises(UsageError, match="quota_bytes"):
            FsBlobStore.from_config({"path": str(tmp_path), "quota_bytes": bad})


def test_constructor_does_no_io(tmp_path: Path) -> None:
    FsBlobStore(tmp_path / "not" / "yet")
    assert not (tmp_path / "not").exists()


async def test_layout_and_stat_path(tmp_path: Path) -> None:
    async with FsBlobStore(tmp_path) as store:
        info = await store.put_bytes(b"hello world")
        path = tmp_path / "sha256" / info.digest.hex[:2] / info.digest.hex
        assert info.path == str(path)
        stat = await store.stat(info.digest)
        assert stat is not None and stat.path == str(path)
        assert path.read_bytes() == b"hello world"
        assert _temp_files(tmp_path) == []


async def test_reads_cross_chunk_boundaries(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(10_000)
    async with FsBlobStore(tmp_path, chunk_size=1000) as store:
        info = await store.put(_chunks(data, 333))
        chunks = [c async for c in store.open(info.digest, offset=1500, length=3001)]
        assert b"".join(chunks) == data[1500:4501]
        assert max(map(len, chunks)) <= 1000


async def test_usage_is_measured_at_open(tmp_path: Path) -> None:
    async with FsBlobStore(tmp_path) as store:
        for n in range(5):
            await store.put_bytes(bytes([n]) * (1000 * n))
    (tmp_path / "sha256" / "README").write_text("not a blob")  # ignored
    (tmp_path / "sha256" / "ab").mkdir(exist_ok=True)
    (tmp_path / "sha256" / "ab" / "not-a-digest").write_bytes(b"x" * 50)  # ignored
    async with FsBlobStore(tmp_path) as store:
        assert await store.usage() == 10_000
        assert len([d async for d in store.iter_digests()]) == 5
        assert await store.count() == 5


async def test_lazy_open_without_async_with(tmp_path: Path) -> None:
    store = FsBlobStore(tmp_path / "lazy")
    try:
        info = await store.put_bytes(b"data")
        assert await store.read_bytes(info.digest) == b"data"
    finally:
        await store.aclose()


async def test_damaged_blob_is_replaced(tmp_path: Path) -> None:
    data = b"the real content" * 100
    digest = Digest.of(data)
    async with FsBlobStore(tmp_path) as store:
        pass
    path = tmp_path / "sha256" / digest.hex[:2] / digest.hex
    path.parent.mkdir(parents=True)
    path.write_bytes(data[:10])  # e.g. written by something that was not crash-safe
    async with FsBlobStore(tmp_path) as store:
        assert await store.usage() == 10
        assert await store.count() == 1
        info = await store.put_bytes(data)
        assert info.size == len(data)
        assert path.read_bytes() == data
        assert await store.usage() == len(data)
        assert await store.count() == 1  # replaced, not added


# --------------------------------------------------------------------------- failures clean up


async def test_failed_puts_leave_no_temp_files(tmp_path: Path) -> None:
    data = b"x" * (3 * MiB)
    async with FsBlobStore(tmp_path) as store:
        with pytest.raises(DigestMismatch):
            await store.put(_chunks(data), expected=Digest.of(b"other"))
        with pytest.raises(DigestMismatch):
            await store.put(_chunks(data), expected_size=MiB)

        async def broken() -> AsyncIterator[bytes]:
            yield data[: 2 * MiB]
            raise OSError("peer went away")

        with pytest.raises(OSError, match="peer went away"):
            await store.put(broken())
        store.quota = MiB
        with pytest.raises(QuotaExceeded):
            await store.put(_chunks(data))
        store.quota = None
        await store.put_bytes(b"twice")
        await store.put_bytes(b"twice")  # the second temp file is discarded
        assert _temp_files(tmp_path) == []
        assert await store.usage() == 5


async def test_cancelled_put_leaves_nothing(tmp_path: Path) -> None:
    stalled = anyio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield b"y" * (2 * MiB)
        stalled.set()
        await anyio.sleep_forever()
        yield b""  # pragma: no cover

    async with FsBlobStore(tmp_path) as store:
        async with anyio.create_task_group() as tg:

            async def put() -> None:
                await store.put(stalls())

            tg.start_soon(put)
            await stalled.wait()
            assert len(_temp_files(tmp_path)) == 1
            tg.cancel_scope.cancel()
        assert _temp_files(tmp_path) == []
        assert [d async for d in store.iter_digests()] == []
        assert await store.usage() == 0


async def test_quota_too_large_stops_reading_early(tmp_path: Path) -> None:
    consumed = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal consumed
        while True:
            consumed += 1
            yield b"z" * 65536

    async with FsBlobStore(tmp_path, quota=MiB) as store:
        with pytest.raises(QuotaExceeded):
            await store.put(endless())
    assert consumed <= MiB // 65536 + 1
    assert _temp_files(tmp_path) == []


# --------------------------------------------------------------------------- crashes

_STALL_MID_PUT = """
import sys, anyio
from pyrsia_storage_fs import FsBlobStore

async def main():
    store = FsBlobStore(sys.argv[1])
    async def chunks():
        for _ in range(8):
            yield b"p" * (1 << 20)
        print("WRITTEN", flush=True)
        await anyio.sleep_forever()
        yield b""
    await store.put(chunks())

anyio.run(main)
"""

_PUT_FOREVER = """
import random, sys, anyio
from pyrsia_storage_fs import FsBlobStore

async def main():
    rng = random.Random(int(sys.argv[2]))
    async with FsBlobStore(sys.argv[1]) as store:
        print("READY", flush=True)
        while True:
            data = rng.randbytes(rng.randrange(1, 3 << 20))
            async def chunks():
                for pos in range(0, len(data), 100_000):
                    yield data[pos:pos + 100_000]
            info = await store.put(chunks())
            print(info.digest, flush=True)

anyio.run(main)
"""


async def test_kill_mid_put_leaves_no_partial_blob(tmp_path: Path) -> None:
    process = await _start(_STALL_MID_PUT, str(tmp_path))
    try:
        assert await _read_line(process) == "WRITTEN"
        (temp,) = _temp_files(tmp_path)
        # Writes run in a worker thread, overlapping the next read: wait for them to land.
        with anyio.fail_after(10):
            while (tmp_path / "tmp" / temp).stat().st_size < 8 * MiB:  # noqa: ASYNC110 - polling another process
                await anyio.sleep(0.02)
        assert (tmp_path / "tmp" / temp).stat().st_size == 8 * MiB
    finally:
        await _kill(process)
    would_be = Digest.of(b"p" * (8 * MiB))
    assert not (tmp_path / "sha256" / would_be.hex[:2] / would_be.hex).exists()
    async with FsBlobStore(tmp_path) as store:
        assert _temp_files(tmp_path) == []  # cleaned at open
        assert await store.stat(would_be) is None
        assert [d async for d in store.iter_digests()] == []
        assert await store.usage() == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_kill_at_random_times_never_shows_a_partial_blob(tmp_path: Path, seed: int) -> None:
    process = await _start(_PUT_FOREVER, str(tmp_path), str(seed))
    try:
        assert await _read_line(process) == "READY"
        await anyio.sleep(random.Random(seed).uniform(0.2, 0.6))
    finally:
        process.send_signal(signal.SIGKILL)
        output = b""
        assert process.stdout is not None
        with anyio.fail_after(10):
            await process.wait()
            try:
                while True:
                    output += await process.stdout.receive()
            except anyio.EndOfStream:
                pass
        await process.aclose()
    assert process.returncode == -signal.SIGKILL
    completed = output.decode().split()  # digests whose put returned before the kill
    async with FsBlobStore(tmp_path) as store:
        assert _temp_files(tmp_path) == []
        total = 0
        async for digest in store.iter_digests():
            hasher = hashlib.sha256()
            async for chunk in store.open(digest):
                hasher.update(chunk)
            assert hasher.hexdigest() == digest.hex  # every visible blob is whole
            info = await store.stat(digest)
            assert info is not None
            total += info.size
        assert await store.usage() == total
        for text in completed:
            assert await store.stat(Digest.parse(text)) is not None


async def test_stale_temp_files_are_removed_at_open(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir(parents=True)
    (tmp_path / "tmp" / "0123.part").write_bytes(b"half a blob")
    (tmp_path / "tmp" / "odd-dir").mkdir()
    async with FsBlobStore(tmp_path) as store:
        assert _temp_files(tmp_path) == []
        assert await store.usage() == 0


# --------------------------------------------------------------------------- locking

_HOLD_OPEN = """
import sys, anyio
from pyrsia_storage_fs import FsBlobStore

async def main():
    async with FsBlobStore(sys.argv[1]):
        print("OPEN", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


async def test_second_store_in_process_is_refused(tmp_path: Path) -> None:
    async with FsBlobStore(tmp_path):
        with pytest.raises(StoreLocked, match=str(tmp_path)):
            async with FsBlobStore(tmp_path):
                pass
    async with FsBlobStore(tmp_path):  # free again once closed
        pass


async def test_directory_used_by_another_process_is_locked(tmp_path: Path) -> None:
    process = await _start(_HOLD_OPEN, str(tmp_path))
    try:
        assert await _read_line(process) == "OPEN"
        with pytest.raises(StoreLocked) as caught:
            await FsBlobStore(tmp_path).put_bytes(b"x")
        assert str(tmp_path) in str(caught.value)
        assert "another pyrsia node" in str(caught.value)
    finally:
        await _kill(process)
    async with FsBlobStore(tmp_path) as store:  # the lock dies with the process
        await store.put_bytes(b"x")


# --------------------------------------------------------------------------- LRU


async def test_touch_and_lru_order(tmp_path: Path) -> None:
    async with FsBlobStore(tmp_path) as store:
        infos = [await store.put_bytes(bytes([n]) * 10) for n in range(4)]
        for age, info in enumerate(infos):  # make put order explicit: infos[0] oldest
            assert info.path is not None
            os.utime(info.path, ns=(10**18 + age * 10**9, 10**18 + age * 10**9))
        assert [d async for d in store.lru_digests()] == [i.digest for i in infos]
        assert await store.touch(infos[1].digest) is True
        assert await store.touch(Digest.of(b"absent")) is False
        order = [d async for d in store.lru_digests()]
        assert order == [infos[0].digest, infos[2].digest, infos[3].digest, infos[1].digest]
        with pytest.raises(BlobNotFound):
            await store.read_bytes(Digest.of(b"absent"))


# --------------------------------------------------------------------------- memory


async def test_memory_stays_flat_for_a_256_mib_blob(tmp_path: Path) -> None:
    size = 256 * MiB
    hasher = hashlib.sha256()
    for n in range(256):
        hasher.update(bytes([n]) * MiB)
    digest = Digest(hasher.hexdigest())

    async def chunks() -> AsyncIterator[bytes]:
        for n in range(256):
            yield bytes([n]) * MiB

    async with FsBlobStore(tmp_path) as store:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            info = await store.put(chunks(), expected=digest, expected_size=size)
            _, put_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            check = hashlib.sha256()
            async for chunk in store.open(digest):
                check.update(chunk)
            _, read_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert (info.size, check.hexdigest()) == (size, digest.hex)
        assert put_peak - base < 16 * MiB, f"put grew memory by {(put_peak - base) / MiB:.1f} MiB"
        assert read_peak - base < 16 * MiB, (
            f"read grew memory by {(read_peak - base) / MiB:.1f} MiB"
        )
