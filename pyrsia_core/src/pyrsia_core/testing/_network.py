"""In-memory test doubles for the network interfaces (STYLE P11).

:class:`MemoryNetwork` connects nodes inside one process: each node serves a
:data:`~pyrsia_core.interfaces.RequestHandler` and a
:data:`~pyrsia_core.interfaces.BlobSource` (or simply a blob store) at a
:class:`~pyrsia_core.interfaces.PeerAddress`, and a :class:`MemoryTransport`
connects to them. Delivery is a direct ``await`` of the peer's handler -- no
tasks, no sleeps, no async library -- so it works under any event loop, and its
faults are deterministic: an address can be *down*, the network can be
*partitioned*, the next N exchanges can fail, exchanges can be dropped with a
seeded probability, and blob streams can be corrupted, truncated or cut.

:class:`MemoryUpstream` is an :class:`~pyrsia_core.interfaces.Upstream` over a
dict, recording every call.

:class:`UpstreamNotFoundError` belongs in :mod:`pyrsia_core.errors`; it lives
here until it moves there, and will stay importable from :mod:`pyrsia_core.testing`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import ClassVar, Final, Literal

import attrs

from .._digest import Digest
from ..errors import PyrsiaError, TransportError, UsageError
from ..interfaces import (
    BlobSource,
    BlobStore,
    PeerAddress,
    PeerBlob,
    PeerClient,
    PeerTransport,
    RequestHandler,
    Upstream,
    UpstreamResponse,
)

__all__ = [
    "Delivery",
    "MemoryNetwork",
    "MemoryPeerClient",
    "MemoryTransport",
    "MemoryUpstream",
    "PeerFaults",
    "UpstreamCall",
    "UpstreamNotFoundError",
    "store_blob_source",
]

#: Largest frame (request or reply) a :class:`MemoryNetwork` carries by default.
DEFAULT_MAX_FRAME_SIZE: Final = 16 << 20
#: Size of the chunks :class:`MemoryUpstream` bodies yield by default.
DEFAULT_CHUNK_SIZE: Final = 64 << 10


class UpstreamNotFoundError(PyrsiaError, LookupError):
    """The upstream has nothing at that locator."""


def _url(address: PeerAddress | str) -> str:
    url = address.url if isinstance(address, PeerAddress) else address
    if not isinstance(url, str) or not url:
        raise UsageError(f"a peer address is a non-empty URL, got {url!r}")
    return url


def store_blob_source(store: BlobStore) -> BlobSource:
    """A :data:`~pyrsia_core.interfaces.BlobSource` serving every blob of ``store``.

    Unknown digests and offsets past the end give ``None`` (not served). The
    blob's ``path`` is passed on, so transports may send it with zero copy.
    """

    async def source(digest: Digest, offset: int) -> PeerBlob | None:
        info = await store.stat(digest)
        if info is None or not 0 <= offset <= info.size:
            return None
        return PeerBlob(info.size, offset, store.open(digest, offset=offset), info.path)

    return source


# --------------------------------------------------------------------------- network


@attrs.define(eq=False)
class PeerFaults:
    """The faults injected for one address; change the fields at any time.

    Exchange faults (checked when a ``connect``, ``request`` or blob fetch to
    the address starts):

    * ``down``: every exchange raises :class:`~pyrsia_core.errors.TransportError`,
      as does ``connect``.
    * ``fail_next``: the next N requests or blob fetches raise ``TransportError``.
    * ``drop_rate``: each request or blob fetch raises ``TransportError`` with
      this probability, drawn from the network's seeded ``rng``.

    Blob faults (applied to the bytes of every blob fetched from the address):

    * ``corrupt_at``: the byte at this offset *of the blob* is flipped (so a
      resumed fetch that starts past it is clean).
    * ``truncate_after``: the stream ends cleanly after this many bytes *of the
      stream*, as a connection closed early without a length check would.
    * ``fail_after``: the stream raises ``TransportError`` when it would go past
      this many bytes of the stream (a blob of exactly that length completes).
    """

    down: bool = False
    fail_next: int = 0
    drop_rate: float = 0.0
    corrupt_at: int | None = None
    truncate_after: int | None = None
    fail_after: int | None = None

    def clear(self) -> None:
        """Remove every fault."""
        self.down = False
        self.fail_next = 0
        self.drop_rate = 0.0
        self.corrupt_at = self.truncate_after = self.fail_after = None


@attrs.frozen
class Delivery:
    """One exchange the network started (``MemoryNetwork.deliveries``), failed or not.

    ``source`` is the URL of the connecting transport, if it has one.
    """

    kind: Literal["request", "fetch_blob"]
    source: str | None
    target: str
    frame: bytes | None = attrs.field(default=None, repr=False)
    digest: Digest | None = None
    offset: int = 0


@attrs.define(eq=False)
class _Peer:
    address: PeerAddress
    handler: RequestHandler
    blobs: BlobSource | None


class MemoryNetwork:
    """Nodes in one process, reachable at their :class:`~pyrsia_core.interfaces.PeerAddress`.

    ::

        network = MemoryNetwork(seed=1)
        network.serve("memory://node-a", handler_a, blob_store_a)
        transport = network.transport("memory://node-b")  # node-b's outgoing side
        client = await transport.connect(PeerAddress("memory://node-a"))
        reply = await client.request(frame, timeout=5)
        network.faults("memory://node-a").down = True  # now every exchange fails

    Addresses are matched by URL. If both the served address and the address
    connected to carry a ``node_id``, they must agree (as a transport that
    authenticates peers would check). ``deliveries`` records every request and
    blob fetch that was started, for assertions.
    """

    def __init__(self, *, seed: int = 0, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < 0:
            raise UsageError(f"max_frame_size must be >= 0, got {max_frame_size}")
        self.max_frame_size = max_frame_size
        #: The generator behind ``drop_rate``; reseed it to replay a run.
        self.rng = random.Random(seed)
        self.deliveries: list[Delivery] = []
        self._peers: dict[str, _Peer] = {}
        self._faults: dict[str, PeerFaults] = {}
        self._groups: list[frozenset[str]] = []
        self._next_id = 0

    # -- serving

    def serve(
        self,
        address: PeerAddress | str,
        handler: RequestHandler,
        blobs: BlobSource | BlobStore | None = None,
    ) -> PeerAddress:
        """Answer requests to ``address`` with ``handler`` and blob fetches from ``blobs``.

        ``blobs`` is a :data:`~pyrsia_core.interfaces.BlobSource` or a
        :class:`~pyrsia_core.interfaces.BlobStore` (served whole, see
        :func:`store_blob_source`); without it no blob is served. Raises
        :class:`~pyrsia_core.errors.UsageError` if the address is already served.
        """
        peer_address = address if isinstance(address, PeerAddress) else PeerAddress(address)
        url = _url(peer_address)
        if url in self._peers:
            raise UsageError(f"{url} is already served")
        source = store_blob_source(blobs) if isinstance(blobs, BlobStore) else blobs
        self._peers[url] = _Peer(peer_address, handler, source)
        return peer_address

    def stop(self, address: PeerAddress | str) -> bool:
        """Stop serving ``address``; return whether it was served."""
        return self._peers.pop(_url(address), None) is not None

    @asynccontextmanager
    async def serving(
        self,
        handler: RequestHandler,
        blobs: BlobSource | BlobStore | None = None,
        *,
        address: PeerAddress | str | None = None,
    ) -> AsyncIterator[PeerAddress]:
        """Serve for the duration of the block, at ``address`` or at a fresh one."""
        served = self.serve(address if address is not None else self.new_address(), handler, blobs)
        try:
            yield served
        finally:
            self.stop(served)

    def new_address(self, prefix: str = "peer") -> PeerAddress:
        """An address no node of this network serves (``memory://peer-1``, ...)."""
        while True:
            self._next_id += 1
            url = f"memory://{prefix}-{self._next_id}"
            if url not in self._peers:
                return PeerAddress(url)

    @property
    def addresses(self) -> list[PeerAddress]:
        """The served addresses, in the order they started."""
        return [peer.address for peer in self._peers.values()]

    def transport(self, address: PeerAddress | str | None = None) -> MemoryTransport:
        """A transport connecting from ``address`` (which partitions take into account)."""
        return MemoryTransport(self, address)

    # -- faults

    def faults(self, address: PeerAddress | str) -> PeerFaults:
        """The (mutable) faults of ``address``; served or not."""
        url = _url(address)
        faults = self._faults.get(url)
        if faults is None:
            faults = self._faults[url] = PeerFaults()
        return faults

    def partition(self, *groups: Iterable[PeerAddress | str]) -> None:
        """Split the network: addresses in different groups cannot reach each other.

        Addresses in no group (and transports without an address) are not
        affected. A new partition replaces the previous one.
        """
        self._groups = [frozenset(_url(a) for a in group) for group in groups]

    def heal(self) -> None:
        """Undo :meth:`partition`."""
        self._groups = []

    def reset_faults(self) -> None:
        """Heal the network and clear the faults of every address."""
        self.heal()
        for faults in self._faults.values():
            faults.clear()

    # -- delivery (used by the clients)

    def _cut_off(self, source: str | None, target: str) -> bool:
        if source is None:
            return False
        mine = {g for g in self._groups if source in g}
        theirs = {g for g in self._groups if target in g}
        return bool(mine and theirs) and not mine & theirs

    def _route(self, source: str | None, target: PeerAddress, *, exchange: bool) -> _Peer:
        """The peer at ``target``, or raise ``TransportError`` as the faults say."""
        url = target.url
        faults = self._faults.get(url)
        if faults is not None and faults.down:
            raise TransportError(f"{url} is down")
        if self._cut_off(source, url):
            raise TransportError(f"{url} is unreachable from {source} (network partition)")
        peer = self._peers.get(url)
        if peer is None:
            raise TransportError(f"nobody is serving {url}")
        if target.node_id is not None and peer.address.node_id not in (None, target.node_id):
            raise TransportError(
                f"{url} is node {peer.address.node_id}, not the expected {target.node_id}"
            )
        if exchange and faults is not None:
            if faults.fail_next > 0:
                faults.fail_next -= 1
                raise TransportError(f"exchange with {url} failed (injected)")
            if faults.drop_rate > 0 and self.rng.random() < faults.drop_rate:
                raise TransportError(f"exchange with {url} was dropped (injected)")
        return peer


class _BlobStream:
    """The body of a blob fetched over a :class:`MemoryNetwork`, with the peer's faults.

    A class rather than an async generator so that ``aclose()`` closes the
    peer's stream even before the first chunk. Opens the blob on the first
    ``__anext__`` unless given an already opened one.
    """

    def __init__(
        self, client: MemoryPeerClient, digest: Digest, offset: int, blob: PeerBlob | None
    ) -> None:
        self._client = client
        self._digest = digest
        self._position = offset  # in the blob
        self._sent = 0  # in this stream
        self._body = blob.body if blob is not None else None
        self._done = False
        self._error: TransportError | None = None  # raised after a partial last chunk

    def __aiter__(self) -> _BlobStream:
        return self

    async def __anext__(self) -> bytes:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._done:
            raise StopAsyncIteration
        client = self._client
        url = client.address.url
        try:
            if self._body is None:
                self._body = (await client._open(self._digest, self._position)).body
            client._check_open()
            try:
                chunk = bytes(await self._body.__anext__())
            except StopAsyncIteration:
                await self.aclose()
                raise
            except Exception as exc:
                raise TransportError(f"{url} failed sending {self._digest}: {exc!r}") from exc
        except BaseException:
            await self.aclose()
            raise
        faults = client._network.faults(url)
        corrupt = faults.corrupt_at
        if corrupt is not None and self._position <= corrupt < self._position + len(chunk):
            i = corrupt - self._position
            chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
        self._position += len(chunk)
        end = self._sent + len(chunk)
        if faults.fail_after is not None and end > faults.fail_after:
            await self.aclose()
            error = TransportError(f"connection to {url} broke (injected)")
            keep = faults.fail_after - self._sent
            if keep <= 0:
                raise error
            self._error = error
            chunk = chunk[:keep]
        elif faults.truncate_after is not None and end >= faults.truncate_after:
            await self.aclose()
            chunk = chunk[: max(faults.truncate_after - self._sent, 0)]
            if not chunk:
                raise StopAsyncIteration
        self._sent += len(chunk)
        return chunk

    async def aclose(self) -> None:
        self._done = True
        body, self._body = self._body, None
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()


class MemoryPeerClient(PeerClient):
    """A :class:`~pyrsia_core.interfaces.PeerClient` of a :class:`MemoryNetwork`.

    Every call re-routes, so faults and a peer that stops serving take effect
    at once. ``timeout`` is validated but not enforced: delivery never waits.
    """

    def __init__(self, network: MemoryNetwork, source: str | None, target: PeerAddress) -> None:
        self._network = network
        self._source = source
        self.address = target

    async def request(self, frame: bytes, *, timeout: float) -> bytes:
        self._check_open()
        if not isinstance(frame, bytes):
            raise UsageError(f"a frame is bytes, got {type(frame).__name__}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        network = self._network
        url = self.address.url
        if len(frame) > network.max_frame_size:
            raise TransportError(
                f"request frame of {len(frame)} bytes exceeds {network.max_frame_size}"
            )
        network.deliveries.append(Delivery("request", self._source, url, frame=frame))
        peer = network._route(self._source, self.address, exchange=True)
        try:
            reply = await peer.handler(frame)
        except Exception as exc:  # the remote side's failure, seen from here
            raise TransportError(f"{url} failed to handle the request: {exc!r}") from exc
        self._check_open()
        if not isinstance(reply, bytes):
            raise TransportError(f"{url} replied with {type(reply).__name__}, not bytes")
        if len(reply) > network.max_frame_size:
            raise TransportError(f"reply of {len(reply)} bytes exceeds {network.max_frame_size}")
        return reply

    def _check_fetch(self, digest: Digest, offset: int, timeout: float) -> None:
        self._check_open()
        if not isinstance(digest, Digest):
            raise UsageError(f"blobs are fetched by Digest, got {type(digest).__name__}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")

    def fetch_blob(
        self, digest: Digest, *, offset: int = 0, timeout: float = 30.0
    ) -> AsyncIterator[bytes]:
        self._check_fetch(digest, offset, timeout)
        return _BlobStream(self, digest, offset, None)

    async def open_blob(
        self, digest: Digest, *, offset: int = 0, timeout: float = 30.0,
        length: int | None = None,
    ) -> PeerBlob:
        # ``length`` is a hint a transport may ignore (the caller stops reading): this
        # one does, so callers are tested against transports that send the whole tail.
        self._check_fetch(digest, offset, timeout)
        blob = await self._open(digest, offset)
        return PeerBlob(blob.size, offset, _BlobStream(self, digest, offset, blob))

    async def _open(self, digest: Digest, offset: int) -> PeerBlob:
        """Ask the peer's blob source (raises ``TransportError`` if it has nothing)."""
        self._check_open()
        network = self._network
        url = self.address.url
        network.deliveries.append(
            Delivery("fetch_blob", self._source, url, digest=digest, offset=offset)
        )
        peer = network._route(self._source, self.address, exchange=True)
        if peer.blobs is None:
            raise TransportError(f"{url} serves no blobs")
        try:
            blob = await peer.blobs(digest, offset)
        except Exception as exc:
            raise TransportError(f"{url} failed to open {digest}: {exc!r}") from exc
        if blob is None:
            raise TransportError(f"{url} does not serve {digest} (from byte {offset})")
        if blob.offset != offset:
            raise TransportError(f"{url} sent {digest} from byte {blob.offset}, not {offset}")
        return blob


class MemoryTransport(PeerTransport):
    """The connecting side of a node on a :class:`MemoryNetwork`.

    ``address`` is the node's own address, used only for partitions and in
    ``deliveries``. Closing the transport closes the clients it made. Nodes
    serve through :meth:`MemoryNetwork.serve`, not :meth:`serve`.
    """

    name: ClassVar[str] = "memory"

    def __init__(self, network: MemoryNetwork, address: PeerAddress | str | None = None) -> None:
        self.network = network
        self.address = _url(address) if address is not None else None
        self._clients: list[MemoryPeerClient] = []

    async def connect(self, address: PeerAddress) -> MemoryPeerClient:
        self._check_open()
        if not isinstance(address, PeerAddress):
            raise UsageError(f"connect takes a PeerAddress, got {type(address).__name__}")
        self.network._route(self.address, address, exchange=False)
        client = MemoryPeerClient(self.network, self.address, address)
        self._clients = [c for c in self._clients if not c.closed]
        self._clients.append(client)
        return client

    async def aclose(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()
        await super().aclose()


# --------------------------------------------------------------------------- upstream


@attrs.frozen
class UpstreamCall:
    """One :meth:`MemoryUpstream.open` call, as recorded in ``calls``."""

    locator: str
    accept: tuple[str, ...] = ()


class MemoryUpstream(Upstream):
    """An :class:`~pyrsia_core.interfaces.Upstream` serving ``{locator: (media_type, bytes)}``.

    Responses carry the size and SHA-256 digest of the registered bytes, and a
    body in ``chunk_size`` chunks. Every ``open`` is appended to ``calls``.
    For integrity tests, :meth:`tamper` serves other bytes under the original
    size and digest, and :meth:`fail` makes a locator raise.
    """

    name: ClassVar[str] = "memory"

    def __init__(
        self,
        artifacts: Mapping[str, tuple[str, bytes]] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size < 1:
            raise UsageError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.artifacts: dict[str, tuple[str, bytes]] = {}
        self.calls: list[UpstreamCall] = []
        self._tampered: dict[str, bytes] = {}
        self._failures: dict[str, Exception] = {}
        for locator, (media_type, data) in (artifacts or {}).items():
            self.add(locator, data, media_type)

    def add(
        self, locator: str, data: bytes, media_type: str = "application/octet-stream"
    ) -> Digest:
        """Serve ``data`` at ``locator`` (replacing what was there); return its digest."""
        if not isinstance(data, bytes):
            raise UsageError(f"artifact data is bytes, got {type(data).__name__}")
        self.artifacts[locator] = (media_type, data)
        self._tampered.pop(locator, None)
        return Digest.of(data)

    def tamper(self, locator: str, served: bytes) -> None:
        """Serve ``served`` at ``locator`` while still announcing the original size and digest."""
        if locator not in self.artifacts:
            raise UsageError(f"nothing to tamper with at {locator!r}")
        self._tampered[locator] = served

    def fail(self, locator: str, error: Exception | None) -> None:
        """Make ``open(locator)`` raise ``error`` (``None`` undoes it)."""
        if error is None:
            self._failures.pop(locator, None)
        else:
            self._failures[locator] = error

    def opened(self, locator: str) -> int:
        """How many times ``locator`` was opened."""
        return sum(1 for call in self.calls if call.locator == locator)

    async def open(self, locator: str, *, accept: Sequence[str] = ()) -> UpstreamResponse:
        self._check_open()
        self.calls.append(UpstreamCall(locator, tuple(accept)))
        failure = self._failures.get(locator)
        if failure is not None:
            raise failure
        entry = self.artifacts.get(locator)
        if entry is None:
            raise UpstreamNotFoundError(f"the upstream has nothing at {locator!r}")
        media_type, data = entry
        served = self._tampered.get(locator, data)
        return UpstreamResponse(
            media_type=media_type,
            size=len(data),
            digest=Digest.of(data),
            body=self._body(served),
        )

    async def _body(self, data: bytes) -> AsyncIterator[bytes]:
        for pos in range(0, len(data), self.chunk_size):
            self._check_open()
            yield data[pos : pos + self.chunk_size]
