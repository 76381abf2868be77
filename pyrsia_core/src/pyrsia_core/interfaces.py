"""The abstract interfaces plugins implement (DESIGN §3, STYLE §3).

Each interface has a small abstract core (the methods whose names start with an
underscore, or the few abstract public ones) and a concrete rim that checks
arguments, enforces limits and maps errors. The core never imports an async
library: these are plain ``async def`` methods, driven by the node's runtime.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, ClassVar

import attrs

from ._digest import Digest
from ._identity import Signer, Verifier
from .errors import StoreClosed, UsageError

__all__ = [
    "BlobInfo",
    "BlobSource",
    "BlobStore",
    "Clock",
    "KeyValueStore",
    "PackageType",
    "PeerAddress",
    "PeerBlob",
    "PeerClient",
    "PeerTransport",
    "RequestHandler",
    "Resource",
    "Signer",
    "SystemClock",
    "Upstream",
    "UpstreamResponse",
    "Verifier",
    "WriteBatch",
]


class Resource(ABC):  # noqa: B024 - a base with a concrete default lifecycle
    """An object holding resources: ``async with`` it, or call :meth:`aclose`."""

    _closed: bool = False

    async def aclose(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"{type(self).__name__} is closed")

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# --------------------------------------------------------------------------- storage


@attrs.frozen
class BlobInfo:
    """What a blob store knows of one blob.

    ``path`` is set by stores that keep each blob in a local file, so that a
    server can send it with zero-copy ``sendfile``; it is ``None`` otherwise.
    """

    digest: Digest
    size: int
    path: str | None = None


class BlobStore(Resource):
    """Content-addressed, immutable blobs.

    ``put`` verifies what it stores: a blob is visible only once all its bytes
    are written and hash to their digest; on any error nothing is left behind.
    """

    #: Largest number of bytes the store may hold, or ``None`` for no limit.
    quota: int | None = None

    @staticmethod
    def quota_from_config(config: Mapping[str, str]) -> int | None:
        """The ``quota_bytes`` entry of a plugin config (absent or empty: no limit)."""
        raw = config.get("quota_bytes")
        if raw is None or raw.strip() == "":
            return None
        try:
            quota = int(raw)
        except ValueError:
            raise UsageError(
                f"quota_bytes must be an integer number of bytes, got {raw!r}"
            ) from None
        if quota < 0:
            raise UsageError(f"quota_bytes must be >= 0, got {quota}")
        return quota

    @abstractmethod
    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        expected: Digest | None = None,
        expected_size: int | None = None,
    ) -> BlobInfo:
        """Store the streamed bytes; raise ``DigestMismatch`` if they are not ``expected``."""

    async def put_bytes(self, data: bytes, *, expected: Digest | None = None) -> BlobInfo:
        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.put(one(), expected=expected, expected_size=len(data))

    @abstractmethod
    def open(
        self, digest: Digest, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """Stream the blob's bytes (``offset``/``length`` for Range); raise ``BlobNotFound``."""

    async def read_bytes(self, digest: Digest) -> bytes:
        return b"".join([chunk async for chunk in self.open(digest)])

    @abstractmethod
    async def stat(self, digest: Digest) -> BlobInfo | None:
        """Size (and path) of a stored blob, or ``None``."""

    @abstractmethod
    async def delete(self, digest: Digest) -> bool:
        """Remove a blob; return whether it was there."""

    @abstractmethod
    def iter_digests(self) -> AsyncIterator[Digest]:
        """Every stored digest, in no particular order."""

    @abstractmethod
    async def usage(self) -> int:
        """Total bytes of the stored blobs."""


class WriteBatch:
    """Puts and deletes applied together, atomically, when the batch ends."""

    def __init__(self) -> None:
        self.ops: list[tuple[bytes, bytes | None]] = []

    def put(self, key: bytes, value: bytes) -> None:
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise UsageError("keys and values are bytes")
        self.ops.append((key, value))

    def delete(self, key: bytes) -> None:
        if not isinstance(key, bytes):
            raise UsageError("keys are bytes")
        self.ops.append((key, None))


class KeyValueStore(Resource):
    """An ordered map of bytes to bytes, shaped like LevelDB.

    Plugins implement :meth:`get`, :meth:`_scan` and :meth:`_write`; batches,
    single puts and argument checks come from this base class.
    """

    @abstractmethod
    async def get(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    def _scan(
        self, prefix: bytes, start: bytes | None, reverse: bool, limit: int | None
    ) -> AsyncIterator[tuple[bytes, bytes]]: ...

    @abstractmethod
    async def _write(self, ops: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Apply all ops (value ``None`` = delete) atomically, in order."""

    def scan(
        self,
        prefix: bytes = b"",
        *,
        start: bytes | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> AsyncIterator[tuple[bytes, bytes]]:
        """Key/value pairs whose key starts with ``prefix``, in key order.

        ``start`` (forward: first key >= start; reverse: first key <= start)
        lets a caller resume a scan. ``limit`` caps the number of pairs.
        """
        self._check_open()
        if start is not None and not start.startswith(prefix):
            raise UsageError("scan start must lie inside the prefix")
        if limit is not None and limit < 0:
            raise UsageError("limit must be >= 0")
        return self._scan(prefix, start, reverse, limit)

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[WriteBatch]:
        """Collect writes; they are applied atomically when the block ends cleanly."""
        self._check_open()
        batch = WriteBatch()
        yield batch
        if batch.ops:
            await self._write(batch.ops)

    async def put(self, key: bytes, value: bytes) -> None:
        async with self.batch() as b:
            b.put(key, value)

    async def delete(self, key: bytes) -> None:
        async with self.batch() as b:
            b.delete(key)


# --------------------------------------------------------------------------- network


@attrs.frozen
class PeerAddress:
    """Where a peer listens, e.g. ``http://127.0.0.1:7888``; the transport interprets it."""

    url: str
    node_id: str | None = None


#: A transport hands every received frame to this and sends back what it returns.
RequestHandler = Callable[[bytes], Awaitable[bytes]]


@attrs.frozen
class PeerBlob:
    """A blob (or its tail from ``offset``) on its way to or from a peer.

    ``size`` is the whole blob's size when known. A serving node sets ``path`` when
    the bytes may be sent with zero copy (no upload rate limit applies); ``body``
    always works.
    """

    size: int | None
    offset: int
    body: AsyncIterator[bytes] = attrs.field(repr=False)
    path: str | None = None


#: What a transport's server asks the node for when a peer requests a blob:
#: ``(digest, offset, peer_hint)`` -> the blob, or ``None`` if it is not served.
BlobSource = Callable[[Digest, int], Awaitable["PeerBlob | None"]]


class PeerClient(Resource):
    """A connection (or pool) to one peer."""

    @abstractmethod
    async def request(self, frame: bytes, *, timeout: float) -> bytes:
        """Send one core-encoded frame and return the reply frame."""

    @abstractmethod
    def fetch_blob(
        self, digest: Digest, *, offset: int = 0, timeout: float = 30.0
    ) -> AsyncIterator[bytes]:
        """Stream a blob from the peer. The caller re-verifies every byte."""

    async def open_blob(
        self, digest: Digest, *, offset: int = 0, timeout: float = 30.0
    ) -> PeerBlob:
        """Like :meth:`fetch_blob`, plus the blob's size when the transport knows it."""
        return PeerBlob(None, offset, self.fetch_blob(digest, offset=offset, timeout=timeout))


class PeerTransport(Resource):
    """Carries core-encoded frames and blobs between nodes; never interprets them.

    A transport either shares the node's HTTP port (:meth:`asgi_app` returns an ASGI
    app the node mounts under ``/p2p``) or listens on its own (:meth:`serve`).
    """

    name: ClassVar[str] = ""

    @abstractmethod
    async def connect(self, address: PeerAddress) -> PeerClient: ...

    def asgi_app(self, handler: RequestHandler, blobs: BlobSource) -> Any | None:
        """An ASGI app serving peers on the node's own HTTP port, or ``None``."""
        return None

    async def serve(
        self, handler: RequestHandler, blobs: BlobSource, *, task_status: Any = None
    ) -> None:
        """Listen for peers until cancelled (transports with their own listener)."""
        raise UsageError(f"the {self.name or type(self).__name__} transport has no own listener")


# --------------------------------------------------------------------------- packages


@attrs.frozen
class UpstreamResponse:
    """An upstream's answer: media type, length and digest (when known) and the body."""

    media_type: str
    size: int | None
    digest: Digest | None
    body: AsyncIterator[bytes] = attrs.field(repr=False)


class Upstream(Resource):
    """Where a build node fetches what it builds (for Docker: a registry)."""

    name: ClassVar[str] = ""

    @abstractmethod
    async def open(self, locator: str, *, accept: Sequence[str] = ()) -> UpstreamResponse:
        """Start fetching ``locator`` (package-type specific, e.g. ``library/alpine/manifests/3``).

        Raises :class:`~pyrsia_core.errors.PyrsiaError` subclasses on failure; the
        caller drains or closes ``body``.
        """


class PackageType(ABC):
    """What a package type (Docker, Maven, ...) knows of its artifacts. Pure and sync."""

    #: The plugin name (``docker``) and the ``package_type`` value in log records (``Docker``).
    name: ClassVar[str] = ""
    record_type: ClassVar[str] = ""

    @abstractmethod
    def parse_package_id(self, text: str) -> str:
        """Normalise a user-given package id (``alpine:3.16.2``) or raise ``ValueError``."""

    @abstractmethod
    def references(self, content: bytes, media_type: str) -> list[tuple[Digest, str]]:
        """Digests (with media types) that a manifest-like artifact points to."""


# --------------------------------------------------------------------------- time


class Clock(ABC):
    """Time is an input: pure code takes ``now``; only the node layer reads a clock."""

    @abstractmethod
    def now(self) -> float:
        """UTC wall-clock seconds (block timestamps, expiry)."""

    @abstractmethod
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, timeouts)."""


class SystemClock(Clock):
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


#: Factories registered under the entry-point groups take the plugin's config.
PluginFactory = Callable[[Mapping[str, str]], Any]
