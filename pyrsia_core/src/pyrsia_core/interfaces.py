"""The abstract interfaces plugins implement (DESIGN §3, STYLE §3).

Each interface has a small abstract core (the methods whose names start with an
underscore, or the few abstract public ones) and a concrete rim that checks
arguments, enforces limits and maps errors. The core never imports an async
library: these are plain ``async def`` methods, driven by the node's runtime.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, ClassVar

import attrs

from ._digest import Digest
from ._identity import Signer, Verifier
from .errors import DigestMismatch, PluginFailed, StoreClosed, UsageError

__all__ = [
    "ASGIApp",
    "ArtifactSink",
    "BlobInfo",
    "BlobSource",
    "BlobStore",
    "BuildInfo",
    "BuiltArtifact",
    "Clock",
    "KeyValueStore",
    "LoggedArtifact",
    "MemorySink",
    "OpeningPeerClient",
    "PackageHost",
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
    "VerifiedBlob",
    "Verifier",
    "WriteBatch",
    "check_blob_args",
    "check_timeout",
    "memory_blob",
    "send_verified_blob",
    "served_blob_problem",
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

    async def adopt(self, path: str, digest: Digest, size: int,
                    read: Callable[[], AsyncIterator[bytes]]) -> BlobInfo:
        """Take in a complete local file that the caller already verified (it hashes to
        ``digest`` and holds ``size`` bytes), so that a blob received once is written
        once: a store that keeps blobs as files may move ``path`` into place (it then
        owns the file). This default streams ``read()`` through :meth:`put`, which
        hashes it again; ``path`` stays the caller's.
        """
        return await self.put(read(), expected=digest, expected_size=size)

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

    async def count(self) -> int:
        """Number of stored blobs (stores that keep the number override this walk)."""
        n = 0
        async for _ in self.iter_digests():
            n += 1
        return n


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
        self,
        digest: Digest,
        *,
        offset: int = 0,
        timeout: float = 30.0,
        length: int | None = None,
    ) -> PeerBlob:
        """Like :meth:`fetch_blob`, plus the blob's size when the transport knows it.

        ``length`` says that only that many bytes from ``offset`` are wanted (one part of
        a blob, from a peer that may hold only that part): a transport that can asks the
        peer for just that range; the caller stops reading after ``length`` bytes anyway.
        """
        return PeerBlob(None, offset, self.fetch_blob(digest, offset=offset, timeout=timeout))


class OpeningPeerClient(PeerClient):
    """A :class:`PeerClient` whose transport gets the peer's answer (and the blob's size)
    before it streams: implement :meth:`_open_blob`; the argument checks,
    :meth:`fetch_blob` and :meth:`open_blob` come from here.
    """

    @abstractmethod
    async def _open_blob(
        self, digest: Digest, offset: int, timeout: float, length: int | None
    ) -> PeerBlob:
        """Ask the peer for the blob (arguments already checked); return once it answered."""

    def fetch_blob(
        self, digest: Digest, *, offset: int = 0, timeout: float = 30.0
    ) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset``, unverified (the caller verifies every byte)."""
        self._check_open()
        check_blob_args(digest, offset, timeout)
        return self._stream(digest, offset, timeout)

    async def _stream(self, digest: Digest, offset: int, timeout: float) -> AsyncIterator[bytes]:
        body = (await self._open_blob(digest, offset, timeout, None)).body
        try:
            async for chunk in body:
                yield chunk
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    async def open_blob(
        self,
        digest: Digest,
        *,
        offset: int = 0,
        timeout: float = 30.0,
        length: int | None = None,
    ) -> PeerBlob:
        """Start a blob fetch: the peer has answered, and ``size`` is the whole blob's size.

        The caller drains ``body`` or closes it (``await body.aclose()``).
        """
        self._check_open()
        check_blob_args(digest, offset, timeout, length)
        return await self._open_blob(digest, offset, timeout, length)


def check_blob_args(
    digest: Digest, offset: int, timeout: float, length: int | None = None
) -> None:
    """Raise :class:`UsageError` unless these are a blob fetch's valid arguments."""
    if not isinstance(digest, Digest):
        raise UsageError(f"a blob is named by a Digest, got {type(digest).__name__}")
    if type(offset) is not int or offset < 0:
        raise UsageError(f"offset must be an integer >= 0, got {offset!r}")
    check_timeout(timeout)
    if length is not None and (type(length) is not int or length < 1):
        raise UsageError(f"length must be an integer >= 1, got {length!r}")


def check_timeout(timeout: float) -> None:
    """Raise :class:`UsageError` unless ``timeout`` is a positive number of seconds."""
    if not (isinstance(timeout, int | float) and timeout > 0 and timeout == timeout):
        raise UsageError(f"timeout must be a positive number of seconds, got {timeout!r}")


def served_blob_problem(blob: PeerBlob, offset: int) -> str | None:
    """What is wrong with a :data:`BlobSource`'s answer to a request from ``offset``
    (for the serving transport's log), or ``None`` when it fits."""
    if blob.offset == offset and (blob.size is not None or not offset):
        return None
    return (
        f"the blob source answered offset {offset} with {blob!r} (expected offset {offset}"
        f"{'' if blob.size is not None else ' and a known size'})"
    )


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


#: An ASGI application (``scope, receive, send``); the core does not import any ASGI library.
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

#: Largest artifact a package type may hand to the node *in memory* (``BuiltArtifact.data``);
#: larger ones are streamed through the :class:`ArtifactSink`, bounded by the disk quota.
MAX_BUILT_ARTIFACT = 2 * 1024**3
#: Most artifacts one package build may produce.
MAX_BUILT_ARTIFACTS = 10_000


@attrs.frozen
class BuiltArtifact:
    """One artifact of a package, as a package type's build yields it.

    ``artifact_id`` becomes the log record's ``package_specific_artifact_id`` (for Maven
    the file's repository path, for Docker ``repository@digest`` or the tag). Either the
    artifact carries its bytes in ``data`` (small ones: a manifest, a POM), which the node
    re-hashes, or the build streamed them into the node first with
    :meth:`ArtifactSink.store` and yields only ``digest`` and ``size`` (large ones: a
    layer, a jar): then the digest must be one this build stored, of that size.
    """

    artifact_id: str
    digest: Digest
    data: bytes | None = attrs.field(default=None, repr=False)
    media_type: str = "application/octet-stream"
    size: int | None = None


class VerifiedBlob:
    """A blob whose bytes hash to ``digest``: stored by the node, verified when stored.

    ``path`` is set when the blob is a local file that a server may send with zero copy
    (see :func:`send_verified_blob`); :meth:`open` always works. A blob still arriving
    (streamed while it is fetched) has ``origin``: where its bytes come from, asked once
    they are served (``"pulled from peer <node id>"``, see :mod:`pyrsia_core.provenance`).
    """

    def __init__(
        self,
        digest: Digest,
        size: int,
        reader: Callable[[int, int | None], AsyncIterator[bytes]],
        path: str | None = None,
        *,
        origin: Callable[[], str | None] | None = None,
        segments: Callable[[int, int], AsyncIterator[bytes | tuple[str, int, int]]]
        | None = None,
    ) -> None:
        self.digest = digest
        self.size = size
        self.path = path
        self.origin = origin
        #: For a blob still arriving into a local file: ``segments(offset, count)`` yields
        #: ``(path, offset, count)`` ranges of that file as they are released (for zero
        #: copy) or, where it has no file to name, the bytes; it raises as :meth:`open`
        #: does. ``None`` when the blob has none.
        self.segments = segments
        self._reader = reader

    def __repr__(self) -> str:
        return f"VerifiedBlob({self.digest}, size={self.size}, path={self.path!r})"

    def open(self, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset`` (``length`` of them, or to the end)."""
        if type(offset) is not int or not 0 <= offset <= self.size:
            raise UsageError(f"offset must be in 0..{self.size}, got {offset!r}")
        if length is not None and (type(length) is not int or length < 0
                                   or offset + length > self.size):
            raise UsageError(f"length {length!r} from {offset} runs past the blob's end")
        return self._reader(offset, length)

    async def read(self, limit: int = 64 * 1024 * 1024) -> bytes:
        """All the bytes, for small blobs only (``UsageError`` above ``limit``)."""
        if self.size > limit:
            raise UsageError(f"{self.digest} has {self.size} bytes, more than {limit} to read "
                             "into memory; stream it with open()")
        return b"".join([chunk async for chunk in self.open()])


class ArtifactSink(ABC):
    """Where a build streams its artifacts: into the node's blob store, verified.

    A :class:`PackageType` that overrides :meth:`PackageType._build_into` gets one per
    build. Bytes are hashed as they arrive, never held whole in memory; room is made in
    the disk quota only as they arrive. A failed build's stored blobs are removed again
    by the node. A blob stored here may be served (:meth:`open`) to the plugin's own
    clients at once, before the build commits: its bytes are verified.
    """

    @abstractmethod
    async def store(
        self,
        chunks: AsyncIterable[bytes],
        *,
        expected: Digest | None = None,
        size: int | None = None,
        on_receiving: Callable[[VerifiedBlob], None] | None = None,
    ) -> BlobInfo:
        """Store the streamed bytes; ``expected`` (when known) and ``size`` are checked.

        Raises :class:`~pyrsia_core.errors.DigestMismatch` (nothing is kept) or
        :class:`~pyrsia_core.errors.QuotaExceeded`.

        A sink that can serve a blob while it arrives calls ``on_receiving`` once (for a
        blob with ``expected`` and ``size``), before the bytes are all in, with a view
        whose :meth:`VerifiedBlob.open` streams the bytes as they are written and
        releases the end only once the whole blob verified; a reader of a blob that then
        fails gets :class:`~pyrsia_core.errors.TransferAborted` before the end.
        """

    @abstractmethod
    async def open(self, digest: Digest) -> VerifiedBlob | None:
        """A blob this build stored (or the node already held), or ``None``."""

    @property
    def quota(self) -> int | None:
        """The node's disk quota in bytes (``None``: no limit), to refuse early what
        cannot fit."""
        return None


@attrs.define(eq=False)
class _CheckedSink(ArtifactSink):
    """The rim's view of a sink: remembers what this build stored, and bounds it."""

    inner: ArtifactSink
    stored: dict[Digest, int] = attrs.Factory(dict)

    async def store(
        self,
        chunks: AsyncIterable[bytes],
        *,
        expected: Digest | None = None,
        size: int | None = None,
        on_receiving: Callable[[VerifiedBlob], None] | None = None,
    ) -> BlobInfo:
        if expected is not None and not isinstance(expected, Digest):
            raise UsageError(f"expected must be a Digest, got {type(expected).__name__}")
        if size is not None and (type(size) is not int or size < 0):
            raise UsageError(f"size must be an integer >= 0, got {size!r}")
        if len(self.stored) >= MAX_BUILT_ARTIFACTS:
            raise UsageError("a build may store at most "
                             f"{MAX_BUILT_ARTIFACTS} blobs")
        info = await self.inner.store(chunks, expected=expected, size=size,
                                      on_receiving=on_receiving)
        if size is not None and info.size != size:
            raise DigestMismatch(f"{size} bytes", f"{info.size} bytes")
        self.stored[info.digest] = info.size
        return info

    async def open(self, digest: Digest) -> VerifiedBlob | None:
        blob = await self.inner.open(digest)
        if blob is not None:  # held already: the build may name it without storing it
            self.stored[blob.digest] = blob.size
        return blob

    @property
    def quota(self) -> int | None:
        return self.inner.quota


class MemorySink(ArtifactSink):
    """An :class:`ArtifactSink` in memory (each blob at most :data:`MAX_BUILT_ARTIFACT`):
    what :meth:`PackageType.build` uses when it is given no sink (tests, tools)."""

    def __init__(self) -> None:
        self.blobs: dict[Digest, bytes] = {}

    async def store(
        self,
        chunks: AsyncIterable[bytes],
        *,
        expected: Digest | None = None,
        size: int | None = None,
        on_receiving: Callable[[VerifiedBlob], None] | None = None,
    ) -> BlobInfo:
        parts: list[bytes] = []
        n = 0
        async for chunk in chunks:
            n += len(chunk)
            if n > MAX_BUILT_ARTIFACT:
                raise UsageError(f"a blob over {MAX_BUILT_ARTIFACT} bytes does not fit in memory")
            parts.append(chunk)
        data = b"".join(parts)
        digest = Digest.of(data)
        if expected is not None and digest != expected:
            raise DigestMismatch(str(expected), str(digest))
        self.blobs[digest] = data
        return BlobInfo(digest, len(data))

    async def open(self, digest: Digest) -> VerifiedBlob | None:
        data = self.blobs.get(digest)
        return memory_blob(data) if data is not None else None


def memory_blob(data: bytes) -> VerifiedBlob:
    """A :class:`VerifiedBlob` of bytes in memory."""

    async def reader(offset: int, length: int | None) -> AsyncIterator[bytes]:
        yield data[offset:None if length is None else offset + length]

    return VerifiedBlob(Digest.of(data), len(data), reader)


@attrs.frozen
class LoggedArtifact:
    """An artifact the transparency log vouches for (from an ``AddArtifact`` record)."""

    package_id: str
    artifact_id: str
    digest: Digest
    timestamp: int
    num_artifacts: int


@attrs.frozen
class BuildInfo:
    """Where a build requested through a :class:`PackageHost` stands.

    ``status`` is ``SUCCESS`` (committed to the log), ``EXISTS`` (already in the log),
    ``REQUESTED`` (a regular node forwarded it to a build node; its records arrive later
    through the ledger), ``NOT_FOUND`` (the upstream does not have the package) or
    ``FAILED`` (``reason`` says why, naming the plugin when the plugin failed).
    """

    build_id: str
    package_id: str
    status: str
    reason: str = ""


class PackageHost(ABC):
    """What a node offers a package-type plugin; one host per plugin.

    The node implements it; a plugin receives it in :meth:`PackageType.asgi_app`. Every
    lookup is bound to the plugin's ``record_type``: a plugin sees and builds its own
    packages only. Everything a host returns is vouched for by the transparency log.
    """

    @property
    @abstractmethod
    def node_id(self) -> str:
        """This node's id."""

    @property
    @abstractmethod
    def is_build_node(self) -> bool:
        """Whether this node builds (regular nodes forward build requests)."""

    @property
    def upstream(self) -> Upstream | None:
        """The node's configured upstream (``pyrsia node start --upstream``), if any: a
        package type without an upstream of its own builds from it."""
        return None

    async def settle(self, prefix: str, *, limit: float = 5.0) -> None:
        """Wait, at most ``limit`` seconds, for this type's running builds of package ids
        starting with ``prefix`` to end (committed or failed): a client answered while
        its package was still being built then sees the build in the log."""
        return None

    @abstractmethod
    async def artifacts(self, package_id: str) -> list[LoggedArtifact]:
        """The logged artifacts of a package (latest record per artifact id); ``[]`` if none."""

    @abstractmethod
    async def package_ids(self, prefix: str) -> list[str]:
        """Logged package ids of this type that start with ``prefix``, sorted."""

    async def artifacts_with_digest(self, digest: Digest) -> list[LoggedArtifact]:
        """Every logged artifact of this type with ``digest`` (e.g. a layer shared by
        several images); ``[]`` if none. Hosts override this walk."""
        return []

    @abstractmethod
    async def open_artifact(self, artifact: LoggedArtifact) -> VerifiedBlob:
        """The artifact's verified bytes, streamed (``open(offset, length)``) or sent with
        zero copy (``path``): never loaded whole into memory.

        From the local store (checked against the log), else from peers (large blobs in
        verified parts from several at once), else (build node) built again from the
        upstream. Raises :class:`~pyrsia_core.errors.ArtifactUnavailable` if no verified
        copy can be had (e.g. the upstream now serves different bytes).
        """

    async def read_artifact(self, artifact: LoggedArtifact) -> bytes:
        """:meth:`open_artifact`, read into memory (small artifacts: a POM, a manifest)."""
        return await (await self.open_artifact(artifact)).read()

    def prefetch(self, artifacts: Sequence[LoggedArtifact]) -> None:
        """Start fetching these logged artifacts from peers in the background, in order,
        one at a time and only while no other fetch runs (what a client asks for goes
        first); those held already are skipped. Returns at once. A plugin calls it when
        a client will likely ask for them next (an image's blobs, once its manifest is
        served). This default does nothing."""
        return None

    async def report_mismatch(self, digest: Digest) -> None:
        """Bytes the host handed out for ``digest`` did not hash to it (the disk changed
        under the node): the host drops its copy, so the next open fetches a good one."""
        return None

    @abstractmethod
    async def build(self, package_id: str, *, artifact_ids: Sequence[str] = ()) -> BuildInfo:
        """Build a package (or join its running build) through the node's commit path.

        On a build node this calls the plugin's :meth:`PackageType.build` with an
        :class:`ArtifactSink` into the node's blob store, stores the artifacts that carry
        bytes and commits one record per artifact not yet logged (with consensus when
        there are several build nodes; with a part list for each large blob, so peers
        can fetch it from several nodes at once) and announces them to peers; it returns
        when the build has ended. ``EXISTS`` if the package (and each of
        ``artifact_ids``) is already logged. A regular node forwards the request to a
        build node (``REQUESTED``).
        """


class PackageType(ABC):
    """What a package type (Docker, Maven, ...) knows of its artifacts.

    The pure part (:meth:`parse_package_id`, :meth:`references`) is sync and does no
    I/O. A package type that serves its own clients and builds on a miss also sets
    :attr:`mount_path` and implements :meth:`asgi_app` and :meth:`_build`: the node
    mounts the app under the path, and runs :meth:`build` (on build nodes, and on
    validators re-checking a proposed block) with a timeout. A plugin that raises,
    hangs or returns garbage fails that request only, with an error naming it.
    """

    #: The plugin name (``docker``) and the ``package_type`` value in log records (``Docker``).
    name: ClassVar[str] = ""
    record_type: ClassVar[str] = ""
    #: URL path the node mounts :meth:`asgi_app` under (``/maven2``); ``""``: no own routes.
    mount_path: ClassVar[str] = ""
    #: The package-id parameter of the node API and CLI (``pyrsia build maven --gav``).
    id_param: ClassVar[str] = "id"
    #: An example package id, for help texts (``alpine:3.16.3``).
    id_example: ClassVar[str] = ""
    #: Seconds a build may take, and the app may wait before (and between the parts of) a
    #: response; ``None``: the node's plugin timeout (``plugin_timeout``).
    build_timeout: ClassVar[float | None] = None
    response_timeout: ClassVar[float | None] = None

    @abstractmethod
    def parse_package_id(self, text: str) -> str:
        """Normalise a user-given package id (``alpine:3.16.2``) or raise ``ValueError``."""

    @abstractmethod
    def references(self, content: bytes, media_type: str) -> list[tuple[Digest, str]]:
        """Digests (with media types) that a manifest-like artifact points to."""

    # -- serving and building (optional) -------------------------------------------------

    def asgi_app(self, host: PackageHost) -> ASGIApp | None:
        """The ASGI app serving this type's clients under :attr:`mount_path`, or ``None``.

        The app sees the mount path in ``scope["root_path"]``; it reads logged artifacts
        and requests builds through ``host`` only.
        """
        return None

    async def artifact_types(self, package_id: str) -> Mapping[str, str]:
        """A type for some logged artifacts of ``package_id``, by artifact id, that
        ``pyrsia inspect-log --artifact-types`` shows (e.g. a Docker image's signatures and
        SBOMs); none by default. Called once :meth:`asgi_app` has its host."""
        del package_id
        return {}

    @property
    def can_build(self) -> bool:
        """Whether this package type implements :meth:`_build` or :meth:`_build_into`."""
        cls = type(self)
        return cls._build is not PackageType._build or (
            cls._build_into is not PackageType._build_into)

    def _build(self, package_id: str, artifact_ids: Sequence[str]) -> AsyncIterator[BuiltArtifact]:
        """Fetch the package from the upstream and yield its artifacts (to override).

        Yields the package's default artifacts plus every one of ``artifact_ids`` (files
        a client asked for that the default set lacks, e.g. a Maven classifier jar; and
        what a validator rebuilds). Deterministic: the same request to the same upstream
        yields the same (artifact id, digest) pairs. Raise
        :class:`~pyrsia_core.errors.ArtifactUnavailable` when the upstream does not have
        the package or a requested artifact, another ``PyrsiaError`` on other failures.

        Each artifact carries its bytes. A package type with large artifacts overrides
        :meth:`_build_into` instead, which streams them into the node.
        """
        raise UsageError(f"package type {self.name!r} does not build packages")

    def _build_into(
        self, package_id: str, artifact_ids: Sequence[str], sink: ArtifactSink
    ) -> AsyncIterator[BuiltArtifact]:
        """Like :meth:`_build`, streaming large artifacts into ``sink`` (to override).

        ``await sink.store(chunks, expected=digest, size=n)`` stores one artifact's bytes,
        verified as they arrive; the build then yields ``BuiltArtifact(artifact_id,
        digest, size=n, media_type=...)`` without bytes. Small artifacts may still carry
        ``data``. By default this calls :meth:`_build`.
        """
        return self._build(package_id, artifact_ids)

    async def fetch_artifact(self, artifact: LoggedArtifact, sink: ArtifactSink) -> bool:
        """Fetch one logged artifact again from the upstream into ``sink`` (to override).

        The node calls this when it must serve a logged artifact that neither its store
        nor a peer has (e.g. evicted by the disk quota), with ``artifact.digest`` to be
        passed as ``expected``. Return ``False`` (the default) to have the node build
        the package again instead.
        """
        return False

    async def build(
        self,
        package_id: str,
        *,
        artifact_ids: Sequence[str] = (),
        sink: ArtifactSink | None = None,
    ) -> list[BuiltArtifact]:
        """Build ``package_id`` (normalised first) and check what the plugin returned.

        Every artifact must be a :class:`BuiltArtifact` with a unique, non-empty id and
        either bytes that hash to its digest or the digest (and size) of a blob this
        build stored in (or opened from) ``sink``; at least one, at most
        :data:`MAX_BUILT_ARTIFACTS`; every requested ``artifact_ids`` among them.
        Exceptions other than ``PyrsiaError`` and garbage become
        :class:`~pyrsia_core.errors.PluginFailed` naming the plugin. Returned artifacts
        always have ``size`` set. Without a ``sink`` a :class:`MemorySink` is used and
        every artifact comes back with its
        ``data`` (for tests and tools; the node passes its own sink).
        """
        from .errors import PyrsiaError

        package_id = self.parse_package_id(package_id)
        wanted = list(dict.fromkeys(artifact_ids))
        memory = MemorySink() if sink is None else None
        checked = _CheckedSink(sink if sink is not None else memory)  # type: ignore[arg-type]
        out: list[BuiltArtifact] = []
        seen: set[str] = set()
        try:
            async for item in self._build_into(package_id, wanted, checked):
                out.append(self._checked_artifact(item, seen, checked))
                if len(out) > MAX_BUILT_ARTIFACTS:
                    raise PluginFailed(self.name, "build yielded too many artifacts")
        except PyrsiaError:
            raise
        except Exception as exc:
            raise PluginFailed(self.name, f"build raised {type(exc).__name__}: {exc}") from exc
        if not out:
            raise PluginFailed(self.name, f"build of {package_id!r:.100} yielded no artifacts")
        missing = [a for a in wanted if a not in seen]
        if missing:
            raise PluginFailed(self.name, f"build of {package_id!r:.100} did not yield the "
                               f"requested {missing[0]!r:.100}")
        if memory is not None:
            out = [item if item.data is not None else
                   attrs.evolve(item, data=memory.blobs[item.digest]) for item in out]
        return out

    def _checked_artifact(
        self, item: Any, seen: set[str], sink: _CheckedSink
    ) -> BuiltArtifact:
        if not isinstance(item, BuiltArtifact):
            raise PluginFailed(self.name, f"build yielded {type(item).__name__}, "
                               "not a BuiltArtifact")
        if not isinstance(item.artifact_id, str) or not item.artifact_id or (
            item.artifact_id in seen
        ):
            raise PluginFailed(self.name, "artifact ids must be unique non-empty "
                               f"strings, got {item.artifact_id!r:.100}")
        if not isinstance(item.digest, Digest):
            raise PluginFailed(self.name, f"artifact {item.artifact_id!r:.100} has no Digest")
        if not isinstance(item.media_type, str):
            raise PluginFailed(self.name, f"artifact {item.artifact_id!r:.100} has a "
                               "media type that is not a string")
        if item.data is not None:
            if not isinstance(item.data, bytes) or len(item.data) > MAX_BUILT_ARTIFACT:
                raise PluginFailed(self.name, f"artifact {item.artifact_id!r:.100} has no "
                                   "bytes or is too large")
            if Digest.of(item.data) != item.digest:
                raise PluginFailed(self.name, f"artifact {item.artifact_id!r:.100} does "
                                   "not hash to the digest the plugin gave")
            if item.size is not None and item.size != len(item.data):
                raise PluginFailed(self.name, f"artifact {item.artifact_id!r:.100} has "
                                   f"{len(item.data)} bytes, not the size it gave")
            item = attrs.evolve(item, size=len(item.data))
        else:
            stored = sink.stored.get(item.digest)
            if stored is None:
                raise PluginFailed(self.name, f"artifact {item.artifact_id!r:.100} has no "
                                   "bytes and its digest was not stored by this build")
            if item.size is not None and item.size != stored:
                raise PluginFailed(self.name, f"artifact {item.artifact_id!r:.100} claims "
                                   f"{item.size!r:.30} bytes; {stored} were stored")
            item = attrs.evolve(item, size=stored)
        seen.add(item.artifact_id)
        checked: BuiltArtifact = item
        return checked


async def send_verified_blob(
    scope: MutableMapping[str, Any],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    blob: VerifiedBlob,
    *,
    offset: int = 0,
    length: int | None = None,
) -> None:
    """Send ``length`` bytes of ``blob`` from ``offset`` as an ASGI response body.

    With zero copy when the blob is a local file and the server offers it (the node's
    ``pyrsia.sendfile`` extension, any range; the standard ``http.response.pathsend``,
    whole file only); otherwise streamed in chunks, the head with the first of them (so
    that a blob in flight that fails before its first byte raises
    :class:`~pyrsia_core.errors.TransferAborted` before anything is sent). ``headers``
    must already include ``content-length``. A ``HEAD`` request gets the headers only.
    """
    count = blob.size - offset if length is None else length
    start = {"type": "http.response.start", "status": status, "headers": list(headers)}
    if scope.get("method") == "HEAD":
        await send(start)
        await send({"type": "http.response.body", "body": b""})
        return
    extensions = scope.get("extensions") or {}
    if blob.path is not None and "pyrsia.sendfile" in extensions:
        await send(start)
        await send({"type": "pyrsia.sendfile", "path": blob.path, "offset": offset,
                    "count": count})
        return
    if (blob.path is not None and "http.response.pathsend" in extensions and offset == 0
            and count == blob.size):
        await send(start)
        await send({"type": "http.response.pathsend", "path": blob.path})
        return
    if blob.segments is not None and "pyrsia.sendfile" in extensions and count:
        await _send_segments(send, start, blob.segments(offset, count))
        return
    body = blob.open(offset, count)
    try:
        # The head goes out with the first bytes: a blob still arriving that fails
        # before any byte is released raises before anything was sent.
        first = b""
        async for first in body:
            if first:
                break
        await send(start)
        if first:
            await send({"type": "http.response.body", "body": first, "more_body": True})
        async for chunk in body:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_segments(
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    start: MutableMapping[str, Any],
    segments: AsyncIterator[bytes | tuple[str, int, int]],
) -> None:
    """A blob still arriving, with zero copy: each released range of its file as it comes
    (the head with the first, so a blob that fails before any byte raises first)."""
    started = False
    try:
        async for item in segments:
            if not started:
                await send(start)
                started = True
            if isinstance(item, bytes):
                await send({"type": "http.response.body", "body": item, "more_body": True})
                continue
            path, at, n = item
            await send({"type": "pyrsia.sendfile", "path": path, "offset": at, "count": n,
                        "more_body": True})
    finally:
        aclose = getattr(segments, "aclose", None)
        if aclose is not None:
            await aclose()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


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
