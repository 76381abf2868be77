"""Blobs in flight: received once, served to every waiting client while they arrive.

A blob fetched from the upstream (during a build) or from peers is written once, to a
file of its own under ``<data dir>/partial/``, and hashed as it is written (writes and
hashes each in a worker thread, :func:`receive`). Clients waiting for it read that file
as it grows (:meth:`Receiving.open`), up to what is *released*:

* while the bytes arrive, everything written but the last :data:`HOLD_BACK` bytes;
* the end once the whole blob hashed to its digest (for a build: the digest its
  manifest names, which is the one the build logs).

On a mismatch (or a failed source) every reader gets
:class:`~pyrsia_core.errors.TransferAborted` before the held-back end: its response is
cut short, so no client ever holds a complete blob that was not verified. The verified
file is then handed to the blob store (:meth:`~pyrsia_core.interfaces.BlobStore.adopt`),
which moves it into place: one write and one hash per byte. A reader that started keeps
reading the same file (its descriptor survives the move), so a client disconnecting, or
a late one joining, never disturbs the fetch.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from contextlib import aclosing
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread
import attrs
from pyrsia_core.errors import DigestMismatch, TransferAborted
from pyrsia_core.interfaces import VerifiedBlob

from pyrsia_core import Digest, DigestVerifier

__all__ = ["HOLD_BACK", "Receiving", "file_reader", "partial_path", "receive"]

#: Bytes at the end of a blob that no client gets before the whole blob verified.
HOLD_BACK = 64 * 1024
#: Bytes gathered before each write (and hash) in the worker threads, and per read.
CHUNK = 1 << 20
#: A reader's open file can be named for zero-copy sends (Linux).
_PROC_FD = os.path.isdir("/proc/self/fd")


@attrs.define(eq=False)
class Receiving:
    """A blob being received: how much of it is written, and how much clients may have."""

    digest: Digest
    path: Path
    #: Its size, once known (a manifest's descriptor, a peer's answer).
    size: int | None = None
    written: int = 0
    released: int = 0
    verified: bool = False
    failed: str | None = None
    #: Where its bytes come from (``"pulled from peer <node id>"``), once known.
    source: str | None = None
    #: Reads the blob from the store once it is there (set when the store took it).
    stored: Callable[[int, int | None], AsyncIterator[bytes]] | None = None
    _changed: anyio.Event = attrs.Factory(anyio.Event)
    _fd: int | None = None
    _readers: int = 0
    _writing: bool = True

    # -- the writer's side ----------------------------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def set_size(self, size: int) -> None:
        if self.size is None:
            self.size = size
            self._notify()

    def _progress(self, written: int) -> None:
        self.written = written
        # Everything but the blob's last HOLD_BACK bytes (or, while its size is not
        # known, the last HOLD_BACK bytes written).
        end = self.size if self.size is not None else written
        self.released = max(self.released, min(written, end - HOLD_BACK))
        self._notify()

    def _verified(self) -> None:
        self.verified = True
        if self.size is None:
            self.size = self.written
        self.released = self.written
        self._notify()

    def fail(self, reason: str) -> None:
        """Cut every reader short (before the end): the blob is not to be served."""
        if self.failed is None and not self.verified:
            self.failed = reason
            self._notify()

    def writer_done(self) -> None:
        self._writing = False
        self._maybe_close()
        self._notify()

    def _maybe_close(self) -> None:
        if not self._writing and not self._readers and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    # -- the readers' side ----------------------------------------------------------

    async def wait_size(self) -> int:
        """The blob's size, once known; raises TransferAborted if it failed first."""
        while self.size is None:
            if self.failed is not None:
                raise TransferAborted(self.failed)
            await self._changed.wait()
        return self.size

    def blob(self) -> VerifiedBlob:
        """What a client is served: its bytes as they are released (size must be known)."""
        if self.size is None:
            raise ValueError("the size of a blob in flight is not known yet")
        return VerifiedBlob(self.digest, self.size, self._read, origin=self._origin,
                            segments=self._segments if _PROC_FD else None)

    def _origin(self) -> str | None:
        return self.source

    async def _segments(
        self, offset: int, count: int
    ) -> AsyncIterator[bytes | tuple[str, int, int]]:
        """``(path, offset, count)`` of the released bytes as they come, for zero copy:
        the path names this reader's open file (``/proc/self/fd/N``), which stays the
        same file when the store moves it into place. Once received and closed, the
        bytes themselves (from the store)."""
        while self._fd is None and self._writing and self.failed is None:
            await self._changed.wait()
        if self._fd is None:
            async for chunk in self._read(offset, count):
                yield chunk
            return
        path = f"/proc/self/fd/{self._fd}"
        async with aclosing(self._released(offset, offset + count)) as ranges:
            async for position, available in ranges:
                yield path, position, available - position

    async def _read(self, offset: int, length: int | None) -> AsyncIterator[bytes]:
        while self._fd is None and self._writing and self.failed is None:
            await self._changed.wait()  # the writer is opening its file
        if self._fd is None:
            # Received and closed: the store has it.
            if self.failed is not None or self.stored is None or not self.verified:
                raise TransferAborted(self.failed or f"{self.digest} is no longer in flight")
            async for chunk in self.stored(offset, length):
                yield chunk
            return
        end = (self.size or 0) if length is None else offset + length
        async with aclosing(self._released(offset, end)) as ranges:
            async for position, available in ranges:
                while position < available:
                    assert self._fd is not None
                    # Just written: in the page cache, so read on the loop (no thread hop).
                    data = os.pread(self._fd, min(CHUNK, available - position), position)
                    if not data:
                        raise TransferAborted(f"{self.path} is shorter than written")
                    position += len(data)
                    yield data

    async def _released(self, offset: int, end: int) -> AsyncGenerator[tuple[int, int], None]:
        """``(start, stop)`` of the bytes of ``offset .. end`` as they are released, in
        order, while this reader keeps the file open; TransferAborted if it fails."""
        self._readers += 1
        try:
            position = offset
            while position < end:
                if self.failed is not None:
                    raise TransferAborted(self.failed)
                available = min(self.released, end)
                if position >= available:
                    await self._changed.wait()
                    continue
                yield position, available
                position = available
        finally:
            self._readers -= 1
            self._maybe_close()


async def receive(
    chunks: AsyncIterable[bytes],
    receiving: Receiving,
) -> tuple[Digest, int]:
    """Write ``chunks`` to ``receiving.path`` once and hash them, each in a worker thread
    of its own while the next ones arrive; release them to readers as they are written;
    verify the digest.

    Writing and hashing run side by side (as ``tee | sha256sum`` would): a write the
    kernel slows down (dirty pages) does not hold the hash back, nor the other way round.
    Bytes beyond the expected size are refused before they are written.

    Returns the digest and size; raises DigestMismatch (every reader is cut short and
    the file is removed) or whatever the source raised. The file stays for the caller
    to hand to the store, or to remove; the caller calls :meth:`Receiving.writer_done`
    once the store has it (or it failed), so that readers can switch to the store.
    """
    verifier = DigestVerifier(expected=receiving.digest, expected_size=receiving.size)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    path = receiving.path
    fd: int | None = None
    try:
        await anyio.to_thread.run_sync(partial(path.parent.mkdir, parents=True, exist_ok=True))
        fd = os.open(path, flags, 0o644)
        receiving._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        receiving._notify()
        to_write, writes = anyio.create_memory_object_stream[bytes](2)
        to_hash, hashes = anyio.create_memory_object_stream[bytes](2)
        failure: list[BaseException] = []
        received = 0

        def write(data: bytes) -> int:
            view = memoryview(data)
            assert fd is not None
            while view:
                view = view[os.write(fd, view):]
            return len(data)

        def hash_(data: bytes) -> None:
            if receiving.size is not None and verifier.expected_size is None:
                verifier.expected_size = receiving.size
            verifier.update(data)

        async def hand_on(parts: list[bytes]) -> None:
            nonlocal received
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            received += len(data)
            if receiving.size is not None and received > receiving.size:
                raise DigestMismatch(str(receiving.digest),
                                     f"<more than {receiving.size} bytes>", size=received)
            await to_hash.send(data)
            await to_write.send(data)

        async def produce() -> None:
            async with to_write, to_hash:
                parts: list[bytes] = []
                buffered = 0
                try:
                    async for chunk in chunks:
                        parts.append(chunk if isinstance(chunk, bytes) else bytes(chunk))
                        buffered += len(chunk)
                        if buffered >= CHUNK:
                            await hand_on(parts)
                            parts, buffered = [], 0
                    if parts:
                        await hand_on(parts)
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:  # handed to the writer, re-raised there
                    failure.append(exc)

        async def hash_all() -> None:
            try:
                async with hashes:
                    async for data in hashes:
                        await anyio.to_thread.run_sync(hash_, data)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                failure.append(exc)
                tg.cancel_scope.cancel()

        written = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            tg.start_soon(hash_all)
            try:
                async with writes:
                    async for data in writes:
                        written += await anyio.to_thread.run_sync(write, data)
                        receiving._progress(written)
            except BaseException as exc:
                tg.cancel_scope.cancel()
                failure.append(exc)
        if failure:
            raise failure[0]
        digest = verifier.verify()
        receiving._verified()
        return digest, written
    except BaseException as exc:
        receiving.fail(_why(exc, receiving.digest))
        await _remove(path)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _why(exc: BaseException, digest: Digest) -> str:
    if isinstance(exc, DigestMismatch):
        return f"the bytes received for {digest} do not match it: {exc}"
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return f"the fetch of {digest} was cancelled"
    return f"the fetch of {digest} failed: {type(exc).__name__}: {exc}"


async def _remove(path: Path) -> None:
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(partial(path.unlink, missing_ok=True))


def partial_path(root: Path, digest: Digest) -> Path:
    """A new file for ``digest`` in flight under ``root`` (unique per fetch)."""
    return root / f"recv-{digest.hex}-{secrets.token_hex(4)}"


def file_reader(path: str) -> Callable[[], AsyncIterator[bytes]]:
    """Read a local file in chunks (a store that cannot adopt the file copies it)."""

    async def read() -> AsyncIterator[bytes]:
        fd = await anyio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        try:
            while data := await anyio.to_thread.run_sync(os.read, fd, CHUNK):
                yield data
        finally:
            os.close(fd)

    return read

