"""A :class:`~pyrsia_core.interfaces.KeyValueStore` on LevelDB, through plyvel.

Every plyvel call runs in a worker thread. A scan reads ``scan_chunk`` pairs per
hop, with a fresh iterator that resumes after the last key, so a scan of
millions of keys neither blocks the event loop nor loads them all, and no
LevelDB iterator outlives a hop (nothing is left open by an abandoned scan).
Like the in-memory store, a scan is therefore not a snapshot: writes made while
it runs may or may not be seen, but keys always come in order, each once.

One process opens a directory once: a second ``LevelDBStore`` on the same path
in this process raises :class:`~pyrsia_core.errors.StoreLocked`, as does a
directory whose LOCK file another process holds. No plyvel exception escapes.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from functools import partial
from itertools import islice, takewhile
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, TypeVar, cast

import anyio
import anyio.to_thread
import plyvel  # type: ignore[import-untyped]
from pyrsia_core.errors import StoreClosed, StoreError, StoreLocked, UsageError
from pyrsia_core.interfaces import KeyValueStore

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SCAN_CHUNK", "LevelDBStore"]

#: Pairs read per worker-thread hop of a scan.
SCAN_CHUNK: Final = 512

_T = TypeVar("_T")


class _Iterator(Protocol):
    def __iter__(self) -> Iterator[tuple[bytes, bytes]]: ...
    def close(self) -> None: ...


class _Batch(Protocol):
    def put(self, key: bytes, value: bytes) -> None: ...
    def delete(self, key: bytes) -> None: ...
    def __enter__(self) -> _Batch: ...
    def __exit__(self, *exc_info: object) -> None: ...


class _DB(Protocol):
    """The part of ``plyvel.DB`` this module uses."""

    def get(self, key: bytes) -> bytes | None: ...
    def write_batch(self, *, transaction: bool, sync: bool) -> _Batch: ...
    def iterator(
        self,
        *,
        reverse: bool,
        start: bytes | None,
        stop: bytes | None,
        include_start: bool,
        include_stop: bool,
    ) -> _Iterator: ...
    def close(self) -> None: ...


# Directories open in this process (by real path). Weak: a store dropped without
# aclose() frees its entry when collected, and plyvel closes the handle then.
_open_paths: weakref.WeakValueDictionary[str, LevelDBStore] = weakref.WeakValueDictionary()
_open_paths_lock = threading.Lock()


def _prefix_successor(prefix: bytes) -> bytes | None:
    """The smallest key above every key starting with ``prefix`` (``None``: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _message(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def _is_lock_error(message: str) -> bool:
    """LevelDB's "IO error: lock <dir>/LOCK: Resource temporarily unavailable"."""
    return "IO error: lock " in message and (
        "temporarily unavailable" in message or "already held" in message
    )


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{name} must be true or false, got {raw!r}")


def _read_range(
    db: _DB,
    low: bytes | None,
    include_low: bool,
    high: bytes | None,
    include_high: bool,
    reverse: bool,
    count: int,
) -> list[tuple[bytes, bytes]]:
    """Up to ``count`` pairs of the range, from the low end (or the high end if ``reverse``)."""
    if not reverse:
        iterator = db.iterator(
            reverse=False,
            start=low,
            stop=high,
            include_start=include_low,
            include_stop=include_high,
        )
        pairs: Iterator[tuple[bytes, bytes]] = iter(iterator)
    else:
        # plyvel 1.5.1 yields nothing in reverse when the first key it lands on
        # equals ``start`` (it compares ``start >= key`` without honouring
        # include_start), so the low bound is applied here instead.
        iterator = db.iterator(
            reverse=True,
            start=None,
            stop=high,
            include_start=True,
            include_stop=include_high,
        )
        pairs = iter(iterator)
        if low is not None:
            pairs = takewhile(
                (lambda kv: kv[0] >= low) if include_low else (lambda kv: kv[0] > low), pairs
            )
    try:
        return list(islice(pairs, count))
    finally:
        iterator.close()


class LevelDBStore(KeyValueStore):
    """An ordered bytes-to-bytes map in a LevelDB directory.

    The constructor does no I/O; the database is opened on first use or on
    ``async with``. With ``sync=True`` (the default) every batch is fsynced
    before it returns, so a committed batch survives a power loss; batches are
    atomic either way.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: bool = True,
        scan_chunk: int = SCAN_CHUNK,
        create_if_missing: bool = True,
    ) -> None:
        if scan_chunk <= 0:
            raise UsageError(f"scan_chunk must be > 0, got {scan_chunk}")
        self.path = Path(path)
        self.sync = sync
        self.create_if_missing = create_if_missing
        self._scan_chunk = scan_chunk
        self._db: _DB | None = None
        self._registered: str | None = None
        self._open_lock = anyio.Lock()
        self._inflight = 0
        self._idle: anyio.Event | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> Self:
        """Entry-point factory: ``path`` (required), ``sync`` and ``create_if_missing``
        (optional, default true: with false, a missing or damaged database is an error)."""
        path = config.get("path")
        if not path:
            raise UsageError("the leveldb store needs a 'path' (its database directory)")
        sync = _parse_bool("sync", config["sync"]) if "sync" in config else True
        create = (_parse_bool("create_if_missing", config["create_if_missing"])
                  if "create_if_missing" in config else True)
        return cls(path, sync=sync, create_if_missing=create)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, sync={self.sync!r})"

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self._ensure_open()
        return self

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, sync: bool = True) -> Self:
        """Create a store and open its database now (raising ``StoreLocked`` early)."""
        store = cls(path, sync=sync)
        await store._ensure_open()
        return store

    async def _ensure_open(self) -> _DB:
        self._check_open()
        if self._db is not None:
            return self._db
        async with self._open_lock:
            self._check_open()
            if self._db is None:
                self._db = await anyio.to_thread.run_sync(self._open_db)
            return self._db

    def _open_db(self) -> _DB:
        key = os.path.realpath(self.path)
        with _open_paths_lock:
            holder = _open_paths.get(key)
            if holder is not None and holder is not self:
                raise StoreLocked(
                    f"LevelDB directory {self.path} is already open in this process "
                    f"({holder!r}); close that store first, or share it"
                )
            _open_paths[key] = self
        try:
            if not self.create_if_missing:
                self._check_existing()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = cast(_DB, plyvel.DB(str(self.path), create_if_missing=self.create_if_missing))
        except StoreError:
            self._unregister(key)
            raise
        except plyvel.IOError as exc:
            self._unregister(key)
            message = _message(exc)
            if _is_lock_error(message):
                raise StoreLocked(
                    f"LevelDB directory {self.path} is locked by another process: another "
                    f"pyrsia node is probably using it ({message})"
                ) from exc
            raise StoreError(f"cannot open LevelDB directory {self.path}: {message}") from exc
        except plyvel.CorruptionError as exc:
            self._unregister(key)
            raise StoreError(
                f"LevelDB directory {self.path} is corrupted: {_message(exc)}"
            ) from exc
        except (plyvel.Error, OSError) as exc:
            self._unregister(key)
            raise StoreError(f"cannot open LevelDB directory {self.path}: {_message(exc)}") from exc
        except BaseException:
            self._unregister(key)
            raise
        self._registered = key
        return db

    def _check_existing(self) -> None:
        """Without ``create_if_missing``: refuse a directory that is not a whole database
        before LevelDB touches it (opening rotates its LOG file even when it then fails)."""
        if not self.path.is_dir():
            raise StoreError(f"LevelDB directory {self.path} does not exist")
        if not (self.path / "CURRENT").is_file():
            raise StoreError(
                f"LevelDB directory {self.path} is damaged: its CURRENT file is missing (it "
                "names the database's MANIFEST); restore it from a backup, or repair the "
                "directory with LevelDB's RepairDB; nothing was changed"
            )

    @staticmethod
    def _unregister(key: str) -> None:
        with _open_paths_lock:
            _open_paths.pop(key, None)

    async def aclose(self) -> None:
        if self._closed:
            return
        await super().aclose()  # from here on, new operations raise StoreClosed
        with anyio.CancelScope(shield=True):
            async with self._open_lock:  # let an open in progress finish
                pass
            while self._inflight:  # never close the handle under a running call
                self._idle = anyio.Event()
                await self._idle.wait()
            db, self._db = self._db, None
            if db is not None:
                await anyio.to_thread.run_sync(self._close_db, db)

    def _close_db(self, db: _DB) -> None:
        try:
            db.close()
        except plyvel.Error as exc:
            raise StoreError(f"closing LevelDB directory {self.path}: {_message(exc)}") from exc
        finally:
            if self._registered is not None:
                self._unregister(self._registered)
                self._registered = None

    # ------------------------------------------------------------------ calls into plyvel

    async def _call(self, func: Callable[[_DB], _T]) -> _T:
        """Run ``func(db)`` in a worker thread, mapping plyvel's exceptions."""
        db = await self._ensure_open()
        self._check_open()
        self._inflight += 1
        try:
            return await anyio.to_thread.run_sync(func, db)
        except plyvel.CorruptionError as exc:
            raise StoreError(
                f"LevelDB directory {self.path} is corrupted: {_message(exc)}"
            ) from exc
        except plyvel.Error as exc:
            raise StoreError(f"LevelDB directory {self.path}: {_message(exc)}") from exc
        except RuntimeError as exc:  # plyvel: "Database is closed"
            if "closed" in str(exc):
                raise StoreClosed(f"{self!r} is closed") from exc
            raise
        finally:
            self._inflight -= 1
            if not self._inflight and self._idle is not None:
                self._idle.set()

    async def get(self, key: bytes) -> bytes | None:
        self._check_open()
        if not isinstance(key, bytes):
            raise UsageError("keys are bytes")
        return await self._call(lambda db: db.get(key))

    async def _write(self, ops: Sequence[tuple[bytes, bytes | None]]) -> None:
        ops = tuple(ops)
        sync = self.sync

        def apply(db: _DB) -> None:
            # transaction=True: an error while filling the batch writes nothing.
            with db.write_batch(transaction=True, sync=sync) as batch:
                for key, value in ops:
                    if value is None:
                        batch.delete(key)
                    else:
                        batch.put(key, value)

        await self._call(apply)

    async def _scan(
        self, prefix: bytes, start: bytes | None, reverse: bool, limit: int | None
    ) -> AsyncIterator[tuple[bytes, bytes]]:
        # Every key in [prefix, successor(prefix)) starts with prefix, so a
        # bounded range is the whole filter. plyvel's ``prefix=`` cannot be
        # combined with start/stop, hence the explicit bounds.
        upper = _prefix_successor(prefix)
        low: bytes | None = prefix
        include_low = True
        high: bytes | None = upper
        include_high = False
        if start is not None:
            if reverse:
                high, include_high = start, True
            else:
                low = start
        remaining = limit
        while remaining is None or remaining > 0:
            count = self._scan_chunk if remaining is None else min(self._scan_chunk, remaining)
            pairs = await self._call(
                partial(
                    _read_range,
                    low=low,
                    include_low=include_low,
                    high=high,
                    include_high=include_high,
                    reverse=reverse,
                    count=count,
                )
            )
            for pair in pairs:
                self._check_open()
                yield pair
            if len(pairs) < count:
                return
            if remaining is not None:
                remaining -= len(pairs)
            # Resume after the last key with a fresh iterator.
            if reverse:
                high, include_high = pairs[-1][0], False
            else:
                low, include_low = pairs[-1][0], False
