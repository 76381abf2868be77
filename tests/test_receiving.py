"""A blob in flight (``pyrsia_registry._receiving``): what readers get, and when.

The node-level behaviour (clients, upstreams, peers) is in ``test_streaming.py``; these
drive one :class:`Receiving` with a source the test controls, byte by byte.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from pyrsia_core.errors import DigestMismatch, TransferAborted
from pyrsia_registry._receiving import HOLD_BACK, Receiving, partial_path, receive

from pyrsia_core import Digest

pytestmark = pytest.mark.anyio

MiB = 1 << 20


class Source:
    """Chunks the test releases one at a time (``give``), then ends (``end``)."""

    def __init__(self) -> None:
        self.send, self.recv = anyio.create_memory_object_stream[bytes | None](100)

    async def give(self, data: bytes) -> None:
        await self.send.send(data)

    async def end(self) -> None:
        await self.send.send(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        async for item in self.recv:
            if item is None:
                return
            yield item


async def settle() -> None:
    for _ in range(20):  # let the writer (a worker thread) and readers move
        await anyio.sleep(0.01)


async def collect(receiving: Receiving, got: list[bytes], errors: list[BaseException],
                  offset: int = 0) -> None:
    try:
        async for chunk in receiving.blob().open(offset):
            got.append(chunk)
    except TransferAborted as exc:
        errors.append(exc)


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


async def test_readers_get_bytes_as_written_and_the_end_once_verified(tmp_path: Path) -> None:
    data = blob(3 * MiB + 123)
    receiving = Receiving(Digest.of(data), partial_path(tmp_path, Digest.of(data)), len(data))
    source = Source()
    got: list[bytes] = []
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(receive, source.chunks(), receiving)
        await settle()
        tg.start_soon(collect, receiving, got, errors)
        await source.give(data[: 2 * MiB])  # a whole write batch
        await settle()
        early = sum(map(len, got))
        assert early == 2 * MiB  # streamed before the rest arrived
        await source.give(data[2 * MiB:])
        await settle()
        # Everything is written, but the end waits for the digest (the stream has not
        # ended yet, so the writer cannot know there is nothing more).
        assert receiving.written == len(data)
        assert sum(map(len, got)) == len(data) - HOLD_BACK
        await source.end()
    assert b"".join(got) == data and not errors
    assert receiving.verified


async def test_a_mismatch_cuts_every_reader_before_the_end(tmp_path: Path) -> None:
    data = blob(2 * MiB + 77)
    bad = data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]
    digest = Digest.of(data)
    path = partial_path(tmp_path, digest)
    receiving = Receiving(digest, path, len(data))
    source = Source()
    results = [([], []) for _ in range(8)]  # type: list[tuple[list[bytes], list[BaseException]]]
    failure: list[BaseException] = []

    async def write() -> None:
        try:
            await receive(source.chunks(), receiving)
        except DigestMismatch as exc:
            failure.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        await settle()
        for got, errors in results:
            tg.start_soon(collect, receiving, got, errors)
        await source.give(bad)
        await source.end()
    assert failure
    for got, errors in results:
        assert errors, "a reader was not cut short"
        assert sum(map(len, got)) <= len(data) - HOLD_BACK
        assert b"".join(got) == data[: sum(map(len, got))]
    assert not path.exists()  # nothing of it is kept


async def test_a_range_of_bytes_already_received_is_answered_at_once(tmp_path: Path) -> None:
    data = blob(4 * MiB)
    digest = Digest.of(data)
    receiving = Receiving(digest, partial_path(tmp_path, digest), len(data))
    source = Source()
    async with anyio.create_task_group() as tg:
        tg.start_soon(receive, source.chunks(), receiving)
        await source.give(data[: 2 * MiB])
        await settle()
        with anyio.fail_after(1):  # the source has not ended: the range needs none of it
            chunks = [c async for c in receiving.blob().open(MiB, MiB)]
        assert b"".join(chunks) == data[MiB: 2 * MiB]
        await source.give(data[2 * MiB:])
        await source.end()


async def test_a_late_reader_after_the_writer_ended_reads_the_store(tmp_path: Path) -> None:
    data = blob(MiB)
    digest = Digest.of(data)
    receiving = Receiving(digest, partial_path(tmp_path, digest), len(data))
    source = Source()
    await source.give(data)
    await source.end()
    await receive(source.chunks(), receiving)
    stored_copy = tmp_path / "stored"
    os.rename(receiving.path, stored_copy)  # the store took the file

    async def from_store(offset: int, length: int | None) -> AsyncIterator[bytes]:
        yield stored_copy.read_bytes()[offset: None if length is None else offset + length]

    receiving.stored = from_store
    receiving.writer_done()
    assert b"".join([c async for c in receiving.blob().open()]) == data
