"""In-memory test doubles for the storage interfaces, a package type and the clock (STYLE P11).

They follow the same contracts as the real plugins -- the conformance suites in
:mod:`pyrsia_core.testing.conformance` run against them -- but keep everything
in process memory and never touch an async library: every method completes
without suspending, so they work under any event loop (or none).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right, insort
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from .._canonical import canonical_json, canonical_loads
from .._digest import Digest, DigestVerifier
from ..errors import BlobNotFound, DigestError, EncodingError, QuotaExceeded, UsageError
from ..interfaces import BlobInfo, BlobStore, Clock, KeyValueStore, PackageType

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "FakeClock",
    "MemoryBlobStore",
    "MemoryKeyValueStore",
    "MemoryPackageType",
    "PackageIdError",
]

#: Size of the chunks :meth:`MemoryBlobStore.open` yields.
CHUNK_SIZE: Final = 1 << 20




def _check_range(offset: int, length: int | None) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if length is not None and length < 0:
        raise ValueError(f"length must be >= 0, got {length}")


# --------------------------------------------------------------------------- blobs


class MemoryBlobStore(BlobStore):
    """A :class:`~pyrsia_core.interfaces.BlobStore` that keeps blobs in a dict.

    ``quota`` is read at every ``put``, so a test may change it at any time.
    ``touch`` and ``lru_digests`` mirror the filesystem store's eviction helpers.
    """

    def __init__(self, *, quota: int | None = None) -> None:
        if quota is not None and quota < 0:
            raise UsageError(f"quota must be >= 0, got {quota}")
        self.quota = quota
        # Insertion order is the LRU order: ``touch`` moves a blob to the end.
        self._blobs: dict[Digest, bytes] = {}
        self._usage = 0

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> Self:
        """Entry-point factory; reads ``quota_bytes`` (optional) and ignores other keys."""
        return cls(quota=BlobStore.quota_from_config(config))

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        expected: Digest | None = None,
        expected_size: int | None = None,
    ) -> BlobInfo:
        self._check_open()
        if expected_size is not None and expected_size < 0:
            raise ValueError(f"expected_size must be >= 0, got {expected_size}")
        quota = self.quota
        # A blob that is already stored costs nothing, so quota checks that run
        # before the digest is known only apply when ``expected`` is new.
        known = expected is not None and expected in self._blobs
        if quota is not None and not known and expected is not None and expected_size is not None:
            # Only a blob larger than the whole quota is refused before its bytes arrive
            # (the node makes room as they arrive; the check below runs again at the end).
            if expected_size > quota:
                self._check_quota(expected_size, quota)
        verifier = DigestVerifier(expected=expected, expected_size=expected_size)
        parts: list[bytes] = []
        async for chunk in chunks:
            self._check_open()
            verifier.update(chunk)
            if quota is not None and not known and verifier.size > quota:
                raise QuotaExceeded(
                    f"blob is larger than the whole quota ({verifier.size} > {quota} bytes)"
                )
            parts.append(bytes(chunk))
        digest = verifier.verify()
        self._check_open()
        stored = self._blobs.get(digest)
        if stored is not None:
            return BlobInfo(digest, len(stored))
        if quota is not None:
            self._check_quota(verifier.size, quota)
        self._blobs[digest] = b"".join(parts)
        self._usage += verifier.size
        return BlobInfo(digest, verifier.size)

    def _check_quota(self, size: int, quota: int) -> None:
        if self._usage + size > quota:
            raise QuotaExceeded(
                f"storing {size} bytes would exceed the quota ({self._usage} of {quota} bytes used)"
            )

    def open(
        self, digest: Digest, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        self._check_open()
        _check_range(offset, length)
        data = self._blobs.get(digest)
        if data is None:
            raise BlobNotFound(f"blob {digest} is not stored")
        if offset > len(data):
            raise ValueError(f"offset {offset} is beyond the end of {digest} ({len(data)} bytes)")
        end = len(data) if length is None else min(len(data), offset + length)
        return self._iter(data, offset, end)

    async def _iter(self, data: bytes, start: int, end: int) -> AsyncIterator[bytes]:
        for pos in range(start, end, CHUNK_SIZE):
            self._check_open()
            yield data[pos : min(pos + CHUNK_SIZE, end)]

    async def stat(self, digest: Digest) -> BlobInfo | None:
        self._check_open()
        data = self._blobs.get(digest)
        return None if data is None else BlobInfo(digest, len(data))

    async def delete(self, digest: Digest) -> bool:
        self._check_open()
        data = self._blobs.pop(digest, None)
        if data is None:
            return False
        self._usage -= len(data)
        return True

    async def iter_digests(self) -> AsyncIterator[Digest]:
        self._check_open()
        for digest in list(self._blobs):
            yield digest

    async def usage(self) -> int:
        self._check_open()
        return self._usage

    async def count(self) -> int:
        self._check_open()
        return len(self._blobs)

    async def touch(self, digest: Digest) -> bool:
        """Record an access (for LRU eviction); return whether the blob is stored."""
        self._check_open()
        data = self._blobs.pop(digest, None)
        if data is None:
            return False
        self._blobs[digest] = data
        return True

    async def lru_digests(self) -> AsyncIterator[Digest]:
        """Stored digests, least recently put or touched first."""
        self._check_open()
        for digest in list(self._blobs):
            yield digest


# --------------------------------------------------------------------------- key/value


def _prefix_successor(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix``, if there is one.

    ``b"a\\xff"`` -> ``b"b"``; ``b""`` and ``b"\\xff\\xff"`` -> ``None`` (no upper bound).
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


@attrs.define(eq=False)
class _Table:
    """The data of a :class:`MemoryKeyValueStore`: a sorted key list next to a dict."""

    keys: list[bytes] = attrs.Factory(list)
    values: dict[bytes, bytes] = attrs.Factory(dict)


class MemoryKeyValueStore(KeyValueStore):
    """A :class:`~pyrsia_core.interfaces.KeyValueStore` over a sorted list and a dict.

    :meth:`reopen` returns a new store over the same data, to simulate a node
    restart. A scan re-finds its position (with :mod:`bisect`) after every pair,
    so writes made while it runs never break it; like the LevelDB store, a scan
    is not a snapshot.
    """

    def __init__(self, *, _table: _Table | None = None) -> None:
        self._table = _table if _table is not None else _Table()

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> Self:
        """Entry-point factory; the memory store takes no configuration."""
        return cls()

    def reopen(self) -> MemoryKeyValueStore:
        """A new, open store sharing this store's data (this one may be closed)."""
        return MemoryKeyValueStore(_table=self._table)

    async def get(self, key: bytes) -> bytes | None:
        self._check_open()
        if not isinstance(key, bytes):
            raise UsageError("keys are bytes")
        return self._table.values.get(key)

    async def _scan(
        self, prefix: bytes, start: bytes | None, reverse: bool, limit: int | None
    ) -> AsyncIterator[tuple[bytes, bytes]]:
        keys = self._table.keys
        values = self._table.values
        count = 0
        if not reverse:
            i = bisect_left(keys, prefix if start is None else start)
        elif start is not None:
            i = bisect_right(keys, start) - 1
        else:
            upper = _prefix_successor(prefix)
            i = (len(keys) if upper is None else bisect_left(keys, upper)) - 1
        while limit is None or count < limit:
            self._check_open()
            if i < 0 or i >= len(keys):
                return
            key = keys[i]
            if not key.startswith(prefix):
                return
            yield key, values[key]
            count += 1
            # Writes may have moved things while we were suspended: find our place again.
            i = bisect_left(keys, key) - 1 if reverse else bisect_right(keys, key)

    async def _write(self, ops: Sequence[tuple[bytes, bytes | None]]) -> None:
        self._check_open()
        keys = self._table.keys
        values = self._table.values
        # Nothing below can fail half-way, so applying in order is atomic.
        for key, value in ops:
            if value is None:
                if values.pop(key, None) is not None:
                    del keys[bisect_left(keys, key)]
            else:
                if key not in values:
                    insort(keys, key)
                values[key] = value


# --------------------------------------------------------------------------- package type


class PackageIdError(UsageError, ValueError):
    """A user-given package id is malformed (belongs in :mod:`pyrsia_core.errors`)."""


_NAME: Final = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
_VERSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class MemoryPackageType(PackageType):
    """A trivial package type for tests: ids are ``name:version``, artifacts are JSON.

    A manifest is ``{"refs": ["sha256:...", ...]}`` (build one with
    :meth:`manifest`), of media type :attr:`MEDIA_TYPE` (or ``application/json``);
    :meth:`references` returns its refs, each with :attr:`BLOB_MEDIA_TYPE`.
    Malformed content raises :class:`~pyrsia_core.errors.EncodingError` (a
    ``ValueError``), a malformed id :class:`PackageIdError` (a ``ValueError``).
    """

    name: ClassVar[str] = "memory"
    record_type: ClassVar[str] = "Memory"

    MEDIA_TYPE: ClassVar[str] = "application/vnd.pyrsia.memory.manifest.v1+json"
    BLOB_MEDIA_TYPE: ClassVar[str] = "application/vnd.pyrsia.memory.blob"
    MAX_ID_LENGTH: ClassVar[int] = 255
    MAX_CONTENT_SIZE: ClassVar[int] = 1 << 20
    MAX_REFS: ClassVar[int] = 10_000

    @classmethod
    def from_config(cls, config: Mapping[str, str] | None = None) -> MemoryPackageType:
        """Entry-point factory; takes no configuration."""
        return cls()

    @classmethod
    def manifest(cls, refs: Iterable[Digest]) -> bytes:
        """The canonical manifest bytes listing ``refs``."""
        return canonical_json({"refs": [str(d) for d in refs]})

    def parse_package_id(self, text: str) -> str:
        if not isinstance(text, str):
            raise PackageIdError(f"a package id is a string, got {type(text).__name__}")
        if len(text) > self.MAX_ID_LENGTH:
            raise PackageIdError(f"package id is longer than {self.MAX_ID_LENGTH} characters")
        name, sep, version = text.partition(":")
        if not sep or not _NAME.fullmatch(name) or not _VERSION.fullmatch(version):
            raise PackageIdError(f"package id {text[:80]!r} is not 'name:version'")
        return text

    def references(self, content: bytes, media_type: str) -> list[tuple[Digest, str]]:
        if media_type not in (self.MEDIA_TYPE, "application/json"):
            raise EncodingError(f"not a {self.name} manifest: media type {media_type!r:.80}")
        if len(content) > self.MAX_CONTENT_SIZE:
            raise EncodingError(f"manifest is larger than {self.MAX_CONTENT_SIZE} bytes")
        doc: Any = canonical_loads(content)
        refs = doc.get("refs") if isinstance(doc, dict) else None
        if not isinstance(refs, list) or set(doc) != {"refs"}:
            raise EncodingError('a manifest is an object {"refs": [...]} and nothing else')
        if len(refs) > self.MAX_REFS:
            raise EncodingError(f"manifest has more than {self.MAX_REFS} refs")
        out: list[tuple[Digest, str]] = []
        for ref in refs:
            try:
                out.append((Digest.parse(ref), self.BLOB_MEDIA_TYPE))
            except DigestError as exc:
                raise EncodingError(f"manifest ref: {exc}") from None
        return out


# --------------------------------------------------------------------------- time


@attrs.define(eq=False)
class FakeClock(Clock):
    """A clock that moves only when told to (STYLE P3).

    ``FakeClock(now=..., monotonic=...)`` sets both readings; :meth:`advance`
    moves both forward. :meth:`set_now` may jump the wall clock either way (as
    NTP can), :meth:`set_monotonic` refuses to go back.
    """

    _wall: float = attrs.field(default=1_700_000_000.0, alias="now")
    _mono: float = attrs.field(default=0.0, alias="monotonic")

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot advance by a negative time ({seconds})")
        self._wall += seconds
        self._mono += seconds

    def set_now(self, wall: float) -> None:
        self._wall = wall

    def set_monotonic(self, value: float) -> None:
        if value < self._mono:
            raise ValueError(f"monotonic time cannot go back ({value} < {self._mono})")
        self._mono = value
