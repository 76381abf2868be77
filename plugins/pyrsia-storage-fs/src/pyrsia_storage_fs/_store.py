"""A content-addressed :class:`~pyrsia_core.interfaces.BlobStore` on a local filesystem.

Layout under the root directory::

    <root>/LOCK                     locked (flock) while a store has the directory open
    <root>/sha256/<hex[:2]>/<hex>   one file per blob, named by its digest
    <root>/tmp/<random>.part        puts in progress
    <root>/quarantine/<hex>         blobs found damaged (moved out by ``quarantine``)

A put streams into a new file in ``tmp/`` and hashes what it writes. Only once
the bytes verify is the file fsynced, renamed into place and the directory
fsynced, so a crash at any point leaves either the whole blob or no blob.
Whatever a crash leaves in ``tmp/`` is removed when the store is next opened.

All blocking file I/O runs in worker threads (``anyio.to_thread``), one chunk
at a time, so memory use does not grow with the size of a blob.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import anyio
import anyio.to_thread
from pyrsia_core.errors import (
    BlobNotFound,
    QuotaExceeded,
    StoreError,
    StoreLocked,
    UsageError,
)
from pyrsia_core.interfaces import BlobInfo, BlobStore

from pyrsia_core import Digest, DigestVerifier

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["CHUNK_SIZE", "FsBlobStore"]

#: Bytes per read and per write hop to a worker thread.
CHUNK_SIZE: Final = 1 << 20
#: Blobs of at most this many bytes (declared) are gathered in memory and stored with
#: one worker-thread call instead of a streaming pipe (manifests, configs, small layers).
SMALL_BLOB: Final = 64 << 10
#: Damaged blobs kept in ``quarantine/`` (the newest; older ones are deleted).
QUARANTINE_KEEP: Final = 16

_T = TypeVar("_T")
_HEX: Final = frozenset("0123456789abcdef")


def _is_hex_name(name: str, length: int) -> bool:
    return len(name) == length and _HEX.issuperset(name)


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)




class _Temp:
    """A file being written in ``tmp/``."""

    __slots__ = ("committed", "fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd
        #: Renamed into place: nothing is left to clean up.
        self.committed = False

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class FsBlobStore(BlobStore):
    """Blobs as files named by their SHA-256 digest, sharded by the first two hex digits.

    The constructor does no I/O. The directory is created, locked against other
    stores, cleaned of interrupted puts and measured on first use (or on
    ``async with``); a directory already open elsewhere raises
    :class:`~pyrsia_core.errors.StoreLocked`.

    ``quota`` (bytes, or ``None``) is read at every ``put``. :meth:`touch` and
    :meth:`lru_digests` let a node evict the least recently used blobs.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        quota: int | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if quota is not None and quota < 0:
            raise UsageError(f"quota must be >= 0, got {quota}")
        if chunk_size <= 0:
            raise UsageError(f"chunk_size must be > 0, got {chunk_size}")
        self.root = Path(root)
        self.quota = quota
        self._chunk_size = chunk_size
        self._blobs = self.root / "sha256"
        self._tmp = self.root / "tmp"
        self._usage = 0
        self._count = 0
        self._ready = False
        self._lock_fd: int | None = None
        self._init_lock = anyio.Lock()
        #: Serialises the steps that change what is stored (rename, unlink) with
        #: the bookkeeping of ``usage``.
        self._commit_lock = anyio.Lock()

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> Self:
        """Entry-point factory: ``path`` (required), ``quota_bytes`` (optional)."""
        path = config.get("path")
        if not path:
            raise UsageError("the fs blob store needs a 'path' (the directory to keep blobs in)")
        return cls(path, quota=BlobStore.quota_from_config(config))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, quota={self.quota!r})"

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self._ensure_ready()
        return self

    async def aclose(self) -> None:
        await super().aclose()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # releases the flock; closing a plain fd does not block

    async def _ensure_ready(self) -> None:
        self._check_open()
        if self._ready:
            return
        async with self._init_lock:
            self._check_open()
            if not self._ready:
                self._usage, self._count = await self._run(self._initialize)
                self._ready = True

    def _initialize(self) -> tuple[int, int]:
        """Create, lock and clean the directory; return the bytes and number of blobs."""
        for directory in (self.root, self._blobs, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            for entry in os.scandir(self._tmp):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            _fsync_dir(self._tmp)
            usage = count = 0
            for shard in os.scandir(self._blobs):
                if not (_is_hex_name(shard.name, 2) and shard.is_dir(follow_symlinks=False)):
                    continue
                for entry in os.scandir(shard.path):
                    if (
                        _is_hex_name(entry.name, 64)
                        and entry.name.startswith(shard.name)
                        and entry.is_file(follow_symlinks=False)
                    ):
                        usage += entry.stat(follow_symlinks=False).st_size
                        count += 1
            return usage, count
        except BaseException:
            self._unlock()
            raise

    def _lock(self) -> None:
        if sys.platform == "win32":
            return
        fd = os.open(
            self.root / "LOCK", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"blob store directory {self.root} is locked (its LOCK file is held): another "
                "pyrsia node is probably using it, or it is already open in this process"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    async def _run(self, func: Callable[[], _T]) -> _T:
        """Run blocking ``func`` in a worker thread; map OS errors to StoreError."""
        try:
            return await anyio.to_thread.run_sync(func)
        except OSError as exc:
            detail = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
            raise StoreError(f"blob store {self.root}: {detail}") from exc

    def _path(self, digest: Digest) -> Path:
        return self._blobs / digest.hex[:2] / digest.hex

    # ------------------------------------------------------------------ put

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        expected: Digest | None = None,
        expected_size: int | None = None,
    ) -> BlobInfo:
        await self._ensure_ready()
        if expected_size is not None and expected_size < 0:
            raise ValueError(f"expected_size must be >= 0, got {expected_size}")
        if expected_size is not None and expected_size <= SMALL_BLOB:
            return await self._put_small(chunks, expected, expected_size)
        quota = self.quota
        # A blob already stored costs nothing, so the checks made before the
        # digest is known only apply when ``expected`` is new.
        known = expected is not None and await self.stat(expected) is not None
        if quota is not None and expected is not None and expected_size is not None and not known:
            # Only a blob larger than the whole quota is refused before its bytes arrive:
            # the node makes room as they arrive, and the commit checks the quota again.
            self._check_quota(expected_size, quota, freed=self._usage)
        verifier = DigestVerifier(expected=expected, expected_size=expected_size)
        temp = await self._run(self._create_temp)
        try:
            await self._pipe(chunks, temp, verifier, quota if not known else None,
                             expected_size)
            digest, fresh = await self._run(partial(self._finish, temp, verifier))
            if not fresh:  # already stored: no fsync, no rename; the temp file goes
                return BlobInfo(digest, verifier.size, str(self._path(digest)))
            with anyio.CancelScope(shield=True):
                async with self._commit_lock:
                    info = await self._commit(temp, digest, verifier.size)
            return info
        finally:
            if not temp.committed:  # failed, cancelled, or the blob was already there
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._discard, temp)

    async def adopt(self, path: str, digest: Digest, size: int,
                    read: Callable[[], AsyncIterator[bytes]]) -> BlobInfo:
        """Move the caller's verified file into place (fsynced first): no second write or
        hash. A file on another filesystem, or of another size, goes through :meth:`put`."""
        await self._ensure_ready()
        if self.quota is not None:
            self._check_quota(size, self.quota)

        def prepare() -> _Temp | None:
            flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(path, flags)
            temp = _Temp(Path(path), fd)
            try:
                if os.fstat(fd).st_size != size or os.stat(path).st_dev != os.stat(
                        self._tmp).st_dev:
                    temp.close()
                    return None
                os.fsync(fd)
                temp.close()
            except BaseException:
                temp.close()
                raise
            return temp

        temp = await self._run(prepare)
        if temp is None:
            return await self.put(read(), expected=digest, expected_size=size)
        with anyio.CancelScope(shield=True):
            async with self._commit_lock:
                info = await self._commit(temp, digest, size)
        return info

    async def _put_small(
        self, chunks: AsyncIterable[bytes], expected: Digest | None, expected_size: int
    ) -> BlobInfo:
        """A small blob: gathered in memory, then verified, written and fsynced in one
        worker-thread call (a streaming pipe costs more than the bytes here)."""
        parts: list[bytes] = []
        seen = 0
        async for chunk in chunks:
            self._check_open()
            parts.append(chunk if isinstance(chunk, bytes) else bytes(chunk))
            seen += len(chunk)
            if seen > expected_size:
                break  # the verifier reports the overrun
        verifier = DigestVerifier(expected=expected, expected_size=expected_size)
        digest, temp = await self._run(partial(self._write_small, b"".join(parts), verifier))
        if temp is None:  # already stored
            return BlobInfo(digest, verifier.size, str(self._path(digest)))
        try:
            with anyio.CancelScope(shield=True):
                async with self._commit_lock:
                    info = await self._commit(temp, digest, verifier.size)
            return info
        finally:
            if not temp.committed:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._discard, temp)

    def _write_small(self, data: bytes, verifier: DigestVerifier) -> tuple[Digest, _Temp | None]:
        verifier.update(data)
        digest = verifier.verify()  # before anything is written: bad bytes never land
        if self._size_of(self._path(digest)) == verifier.size:
            return digest, None
        temp = self._create_temp()
        try:
            assert temp.fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(temp.fd, view):]
            os.fsync(temp.fd)
            temp.close()
        except BaseException:
            self._discard(temp)
            raise
        return digest, temp

    async def _pipe(
        self,
        chunks: AsyncIterable[bytes],
        temp: _Temp,
        verifier: DigestVerifier,
        quota: int | None,
        expected_size: int | None,
    ) -> None:
        """Hash and write ``chunks`` to ``temp`` in a worker thread while the next ones arrive.

        Receiving (often network I/O on the event loop) and hashing plus writing (in a
        thread, releasing the GIL) overlap, with at most a few chunks buffered, so
        memory stays flat and both cores are used.
        """
        send, receive = anyio.create_memory_object_stream[list[bytes]](2)
        failure: list[BaseException] = []

        async def produce() -> None:
            async with send:
                parts: list[bytes] = []
                buffered = 0
                seen = 0
                try:
                    async for chunk in chunks:
                        self._check_open()
                        seen += len(chunk)
                        if quota is not None and seen > quota:
                            raise QuotaExceeded(
                                f"blob is larger than the whole quota (over {quota} bytes)"
                            )
                        parts.append(chunk if isinstance(chunk, bytes) else bytes(chunk))
                        buffered += len(chunk)
                        if buffered >= self._chunk_size or (
                            expected_size is not None and seen > expected_size
                        ):
                            await send.send(parts)
                            parts, buffered = [], 0
                    if parts:
                        await send.send(parts)
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:  # handed to the writer, re-raised there
                    failure.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            try:
                async with receive:
                    async for parts in receive:
                        await self._run(partial(self._write, temp, verifier, parts))
            except BaseException as exc:
                tg.cancel_scope.cancel()
                failure.append(exc)
        if failure:
            raise failure[0]

    def _check_quota(self, size: int, quota: int, *, freed: int = 0) -> None:
        if self._usage - freed + size > quota:
            raise QuotaExceeded(
                f"storing {size} bytes would exceed the quota ({self._usage} of {quota} bytes used)"
            )

    def _create_temp(self) -> _Temp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        flags |= getattr(os, "O_CLOEXEC", 0)
        path = self._tmp / f"{secrets.token_hex(16)}.part"
        return _Temp(path, os.open(path, flags, 0o644))

    @staticmethod
    def _write(temp: _Temp, verifier: DigestVerifier, parts: list[bytes]) -> None:
        if not parts:
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        verifier.update(data)  # raises as soon as expected_size is overrun
        assert temp.fd is not None
        view = memoryview(data)
        while view:
            written = os.write(temp.fd, view)
            view = view[written:]

    def _finish(self, temp: _Temp, verifier: DigestVerifier) -> tuple[Digest, bool]:
        """Verify, then fsync unless the blob is already stored; return (digest, fresh)."""
        digest = verifier.verify()  # before fsync: a bad blob is never made durable
        if self._size_of(self._path(digest)) == verifier.size:
            return digest, False
        assert temp.fd is not None
        os.fsync(temp.fd)
        temp.close()
        return digest, True

    async def _commit(self, temp: _Temp, digest: Digest, size: int) -> BlobInfo:
        """Move a verified temp file into place. Runs under the commit lock, shielded."""
        final = self._path(digest)
        seen: list[int | None] = []
        try:
            await self._run(partial(self._place, temp, final, size, seen))
        finally:
            if temp.committed:  # even if the directory fsync then failed
                self._usage += size - (seen[0] or 0)
                if seen[0] is None:
                    self._count += 1
        return BlobInfo(digest, size, str(final))

    def _place(self, temp: _Temp, final: Path, size: int, seen: list[int | None]) -> None:
        """Rename ``temp`` to ``final`` unless the blob is there already (one thread call)."""
        existing = self._size_of(final)
        seen.append(existing)
        if existing == size:
            return  # already stored: the temp is discarded
        # ``existing`` of another size is a damaged file (content addressing makes
        # it impossible otherwise): the verified bytes replace it.
        if self.quota is not None:
            self._check_quota(size, self.quota, freed=existing or 0)
        self._rename_into_place(temp, final)

    @staticmethod
    def _size_of(path: Path) -> int | None:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    @staticmethod
    def _rename_into_place(temp: _Temp, final: Path) -> None:
        shard = final.parent
        try:
            shard.mkdir()
        except FileExistsError:
            pass
        else:
            _fsync_dir(shard.parent)
        os.replace(temp.path, final)
        temp.committed = True
        _fsync_dir(shard)

    @staticmethod
    def _discard(temp: _Temp) -> None:
        try:
            temp.close()
        finally:
            try:
                os.unlink(temp.path)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ read

    async def open(
        self, digest: Digest, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        await self._ensure_ready()
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if length is not None and length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        fd, size = await self._run(partial(self._open_for_read, digest))
        try:
            if offset > size:
                raise ValueError(f"offset {offset} is beyond the end of {digest} ({size} bytes)")
            end = size if length is None else min(size, offset + length)
            position = offset
            while position < end:
                self._check_open()
                data = await self._run(
                    partial(os.pread, fd, min(self._chunk_size, end - position), position)
                )
                if not data:
                    raise StoreError(f"blob file {self._path(digest)} is shorter than it was")
                position += len(data)
                yield data
        finally:
            os.close(fd)  # a read-only fd: closing does not block

    def _open_for_read(self, digest: Digest) -> tuple[int, int]:
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self._path(digest), flags)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is not stored in {self.root}") from None
        try:
            return fd, os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise

    async def stat(self, digest: Digest) -> BlobInfo | None:
        await self._ensure_ready()
        path = self._path(digest)
        # One stat of a local file: a few microseconds, cheaper than the hop to a worker
        # thread it used to take (callers ask before every fetch and every serve).
        try:
            size = self._size_of(path)
        except OSError as exc:
            raise StoreError(f"blob store {self.root}: {exc}") from exc
        return None if size is None else BlobInfo(digest, size, str(path))

    # ------------------------------------------------------------------ delete, listing

    async def delete(self, digest: Digest) -> bool:
        await self._ensure_ready()
        with anyio.CancelScope(shield=True):
            async with self._commit_lock:
                size = await self._run(partial(self._unlink, self._path(digest)))
                if size is not None:
                    self._usage -= size
                    self._count -= 1
        return size is not None

    @staticmethod
    def _unlink(path: Path) -> int | None:
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return None
        return size

    async def iter_digests(self) -> AsyncIterator[Digest]:
        await self._ensure_ready()
        for shard in await self._run(self._shards):
            for digest, _ in await self._run(partial(self._list_shard, shard, False)):
                self._check_open()
                yield digest

    def _shards(self) -> list[str]:
        return sorted(
            entry.name
            for entry in os.scandir(self._blobs)
            if _is_hex_name(entry.name, 2) and entry.is_dir(follow_symlinks=False)
        )

    def _list_shard(self, shard: str, with_mtime: bool) -> list[tuple[Digest, int]]:
        out: list[tuple[Digest, int]] = []
        try:
            entries = list(os.scandir(self._blobs / shard))
        except FileNotFoundError:
            return out
        for entry in entries:
            if not (_is_hex_name(entry.name, 64) and entry.name.startswith(shard)):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns if with_mtime else 0
            except FileNotFoundError:  # deleted meanwhile
                continue
            out.append((Digest(entry.name), mtime))
        return out

    async def usage(self) -> int:
        await self._ensure_ready()
        return self._usage

    async def count(self) -> int:
        await self._ensure_ready()
        return self._count

    # ------------------------------------------------------------------ LRU eviction support

    async def touch(self, digest: Digest) -> bool:
        """Record an access (the file's mtime) for LRU eviction; return whether it is stored."""
        await self._ensure_ready()
        return await self._run(partial(self._utime, self._path(digest)))

    @staticmethod
    def _utime(path: Path) -> bool:
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    async def lru_entries(self) -> list[tuple[Digest, int, float]]:
        """``(digest, size, last used)`` of every stored blob, least recently used first
        (last used: the put or the latest :meth:`touch`, as UNIX seconds)."""
        await self._ensure_ready()
        return await self._run(self._all_entries)

    def _all_entries(self) -> list[tuple[Digest, int, float]]:
        out: list[tuple[Digest, int, float]] = []
        for shard in self._shards():
            for digest, _ in self._list_shard(shard, False):
                try:
                    st = os.stat(self._path(digest))
                except FileNotFoundError:
                    continue
                out.append((digest, st.st_size, st.st_mtime))
        out.sort(key=lambda e: e[2])
        return out

    async def quarantine(self, digest: Digest) -> str | None:
        """Move a damaged blob out of the store into ``quarantine/`` (kept for inspection,
        the newest :data:`QUARANTINE_KEEP` only); return its new path, ``None`` if absent."""
        await self._ensure_ready()
        with anyio.CancelScope(shield=True):
            async with self._commit_lock:
                moved = await self._run(partial(self._move_to_quarantine, digest))
                if moved is not None:
                    self._usage -= moved[1]
                    self._count -= 1
        return None if moved is None else moved[0]

    def _move_to_quarantine(self, digest: Digest) -> tuple[str, int] | None:
        qdir = self.root / "quarantine"
        qdir.mkdir(exist_ok=True)
        path = self._path(digest)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return None
        target = qdir / digest.hex
        os.replace(path, target)
        _fsync_dir(path.parent)
        kept = sorted(qdir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[QUARANTINE_KEEP:]:
            old.unlink(missing_ok=True)
        return str(target), size

    async def lru_digests(self) -> AsyncIterator[Digest]:
        """Stored digests, least recently put or touched first."""
        await self._ensure_ready()
        entries: list[tuple[int, Digest]] = []
        for shard in await self._run(self._shards):
            listed = await self._run(partial(self._list_shard, shard, True))
            entries.extend((mtime, digest) for digest, mtime in listed)
        entries.sort()
        for _, digest in entries:
            self._check_open()
            yield digest
