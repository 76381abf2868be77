"""Swarm fetch: a large blob in verified parts from every node that holds some of it.

When several nodes fetch the same large blob at once, one provider's upload link is
the bottleneck. A blob whose *part list* is in the log (see
:class:`pyrsia_core.PartList`) is therefore fetched part by part, from any node that
holds the part -- including nodes that are fetching it too -- and every part is checked
against the logged list before it is written or served on. Parts are chosen rarest
first (ties at random), each from the least busy holder, a few at a time; holders
say which parts they have (``GET_PARTS``). A holder that sends a wrong part is
reported and not asked again for this blob. Once every part is in, the whole blob is
hashed into the store against its logged digest, as any fetched blob.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
import attrs
from pyrsia_core._kademlia import Contact
from pyrsia_core._wire import Envelope
from pyrsia_core.errors import PeerMisbehaved, PyrsiaError, TransportError
from pyrsia_core.interfaces import BlobInfo, PeerBlob, PeerClient

from pyrsia_core import Digest, PartList

from ._node import Node
from ._receiving import Receiving

__all__ = ["PartialBlob", "SwarmFetch", "SwarmPeers"]


class _Timeouts(Protocol):
    @property
    def blob_timeout(self) -> float: ...


class SwarmPeers(Protocol):
    """What a swarm fetch needs of the peer service: the dependency points from the peer
    service to the swarm only (``_p2p`` imports ``_swarm``, never the other way)."""

    @property
    def node(self) -> Node: ...

    @property
    def config(self) -> _Timeouts: ...

    async def _client(self, address: str) -> PeerClient: ...

    def _blame(self, node_id: str, reason: str) -> None: ...

    async def announce(self, digests: Sequence[Digest]) -> None: ...

    async def find_providers(self, digest: Digest) -> list[Contact]: ...

    def _rank(self, providers: list[Contact], key: bytes) -> list[Contact]: ...

    async def rpc(
        self, address: str, type_: str, body: dict[str, Any], expect: set[str],
        attachment: bytes | None = None, *, timeout: float | None = None,  # noqa: ASYNC109
        sender: str | None = None,
    ) -> Envelope: ...

    def query_timeout(self, node_id: str) -> float: ...

    def received_from(self, node_id: str, count: int) -> None:
        """Count ``count`` verified bytes received from peer ``node_id``."""

log = logging.getLogger("pyrsia.p2p")

#: Parts in flight at once for one blob, and from one holder: one from a holder that
#: is uploading to others (so a busy seeder spreads its parts over the fetchers), a
#: few from an idle one (so a lone fetcher is not bound by one request at a time).
PARTS_IN_FLIGHT = 6
PER_HOLDER = 1
PER_IDLE_HOLDER = 2
#: Parts one request may cover while this node is the only one fetching the blob.
MAX_RUN = 32
#: How often holders are asked which parts they have, and providers looked up again.
POLL_INTERVAL = 0.5
LOOKUP_INTERVAL = 4.0
SERVE_PIECE = 256 * 1024


@attrs.define(eq=False)
class PartialBlob:
    """A blob being assembled on disk; only verified parts are marked (and served)."""

    parts: PartList
    path: Path
    have: bytearray = attrs.field(init=False)
    count: int = 0
    _fd: int = attrs.field(init=False, default=-1)

    def __attrs_post_init__(self) -> None:
        self.have = bytearray(len(self.parts))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.parts.size)

    def check_and_put(self, index: int, data: bytes) -> bool:
        """Check part ``index`` against the part list and, if it matches, write it (a
        worker thread's part of :meth:`write`; the caller then calls :meth:`mark`)."""
        if not self.parts.check(index, data):
            return False
        self._pwrite(index, data)
        return True

    def mark(self, index: int) -> None:
        """Part ``index`` is written and verified (on the event loop)."""
        if not self.have[index]:
            self.have[index] = 1
            self.count += 1

    def sync(self) -> None:
        os.fsync(self._fd)

    def write(self, index: int, data: bytes) -> None:
        """Store part ``index`` (already checked against the part list)."""
        if self.have[index]:
            return
        self._pwrite(index, data)
        self.mark(index)

    def _pwrite(self, index: int, data: bytes) -> None:
        offset, _ = self.parts.span(index)
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            offset += n
            view = view[n:]

    @property
    def complete(self) -> bool:
        return self.count == len(self.parts)

    def bitmap(self) -> str:
        """Which parts are here: bit ``i`` of the big-endian hex number is part ``i``."""
        value = 0
        for i, flag in enumerate(self.have):
            if flag:
                value |= 1 << i
        return format(value, "x")

    def run_from(self, offset: int) -> int:
        """Bytes from ``offset`` (a part boundary) that are verified and contiguous."""
        size = self.parts.part_size
        if offset % size:
            return 0
        index, end = offset // size, offset
        while index < len(self.have) and self.have[index]:
            end = min(self.parts.size, (index + 1) * size)
            index += 1
        return end - offset

    def read_part(self, index: int) -> bytes:
        offset, length = self.parts.span(index)
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(f"partial blob {self.path} is shorter than expected")
        return data

    async def read(self, offset: int, count: int) -> AsyncIterator[bytes]:
        while count > 0:
            piece = os.pread(self._fd, min(SERVE_PIECE, count), offset)
            if not piece:
                raise OSError(f"partial blob {self.path} is shorter than expected")
            offset += len(piece)
            count -= len(piece)
            yield piece

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


def parse_bitmap(value: Any, parts: int) -> bytearray | None:
    """A holder's ``have`` answer: ``"all"``, or the hex bitmap of :meth:`bitmap`."""
    if value == "all":
        return bytearray(b"\x01" * parts)
    if not isinstance(value, str) or len(value) > parts // 4 + 2:
        return None
    try:
        number = int(value, 16) if value else 0
    except ValueError:
        return None
    return bytearray((number >> i) & 1 for i in range(parts))


@attrs.define(eq=False)
class _Holder:
    node_id: str
    address: str
    have: bytearray
    sending: bytearray = attrs.Factory(bytearray)
    inflight: int = 0
    others: int = 0  # uploads the holder reported to others than us at the last poll
    learned: bool = False  # it asked us for parts: it is fetching the blob too
    throughput: float = 0.0
    banned: bool = False
    polled: float = 0.0


@attrs.define(eq=False)
class SwarmFetch:
    """One swarm fetch of ``digest`` by ``peers``' node."""

    peers: SwarmPeers
    digest: Digest
    parts: PartList
    partial: PartialBlob
    holders: dict[str, _Holder] = attrs.Factory(dict)
    inflight: set[int] = attrs.Factory(set)
    served_by: dict[str, int] = attrs.Factory(dict)
    #: Bytes of verified parts received (progress, for the stall check).
    received: int = 0
    _wake: anyio.Event = attrs.Factory(anyio.Event)
    #: The blob as clients read it while its parts arrive (set by :meth:`run`).
    receiving: Receiving | None = None
    #: Parts in order from the first that are in.
    _prefix: int = 0
    _crowded: bool = False
    _first_part_at: float = 0.0
    _rng: random.Random = attrs.Factory(random.Random)
    #: Told when the blob starts streaming into the store (clients read it as it grows).
    on_receiving: Callable[[Receiving], None] | None = None

    async def run(self) -> BlobInfo:
        """Fetch every part (each checked against the logged list as it arrives, written
        once into the partial file), streaming the verified prefix to clients (the
        ``Receiving`` over that file), then hand the file to the store."""
        node = self.peers.node
        receiving = self.receiving = Receiving(self.digest, self.partial.path,
                                               self.parts.size)
        receiving._fd = os.open(self.partial.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        node.list_receiving(receiving)
        try:
            if self.on_receiving is not None:
                self.on_receiving(receiving)
            await self._fetch_parts()
            # Every byte is in a part that hashed to the logged list, which names the
            # blob's digest and size: the blob is verified without a second hash.
            receiving._progress(self.parts.size)
            receiving._verified()
            await anyio.to_thread.run_sync(self.partial.sync)
            return await node.store_verified_file(self.partial.path, self.digest,
                                                  self.parts.size, receiving)
        except BaseException as exc:
            receiving.fail(f"the swarm fetch of {self.digest} failed: "
                           f"{type(exc).__name__}: {exc}")
            raise
        finally:
            receiving.writer_done()
            node.unlist_receiving(receiving)

    async def _fetch_parts(self) -> None:
        started = time.monotonic()
        slots = anyio.Semaphore(PARTS_IN_FLIGHT)
        progress, progress_at = -1, started
        stalled: TransportError | None = None
        async with anyio.create_task_group() as tg:
            # Others fetching it too can find this node at once and get its parts.
            tg.start_soon(self._announce)
            tg.start_soon(self._watch_holders)
            while not self.partial.complete:
                now = time.monotonic()
                if self.received != progress:
                    progress, progress_at = self.received, now
                elif now - progress_at > 2 * self.peers.config.blob_timeout:
                    stalled = TransportError(
                        f"no peer sent a good part of {self.digest} for "
                        f"{now - progress_at:.0f} s ({self.partial.count} of "
                        f"{len(self.parts)} parts in)"
                    )
                    break
                await slots.acquire()
                choice = self._pick()
                if choice is None:
                    slots.release()
                    with anyio.move_on_after(0.2):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                index, count, holder = choice
                self.inflight.update(range(index, index + count))
                holder.inflight += 1
                tg.start_soon(self._fetch_run, index, count, holder, slots)
            all_parts_at = time.monotonic()
            tg.cancel_scope.cancel()
        if stalled is not None:
            raise stalled
        log.info(
            "Blob %s pulled from peers in %d verified parts (%s), %.1f s (first part after "
            "%.2f s, all parts after %.2f s)",
            self.digest,
            len(self.parts),
            ", ".join(f"{n[:16]}: {c}" for n, c in sorted(self.served_by.items())),
            time.monotonic() - started,
            self._first_part_at - started,
            all_parts_at - started,
        )

    def _part_written(self) -> None:
        if not self._first_part_at:
            self._first_part_at = time.monotonic()
        # Clients get the verified prefix (the parts in order from the first).
        have = self.partial.have
        while self._prefix < len(have) and have[self._prefix]:
            self._prefix += 1
        if self.receiving is not None:
            self.receiving.source = "pulled from peer " + ", ".join(self.served_by)
        if self.receiving is not None and self._prefix:
            end = self.parts.span(self._prefix - 1)
            self.receiving._progress(end[0] + end[1])

    # -- which part next, from whom ------------------------------------------------------

    @property
    def crowded(self) -> bool:
        """Do other nodes fetch this blob too (a holder with only some parts, or one that
        uploads to others)? Then parts go rarest first, one per request; alone, runs of
        parts are streamed in order."""
        if not self._crowded:
            self._crowded = any(
                h.others or (h.polled and not all(h.have)) or h.learned
                for h in self.holders.values()
            )
        return self._crowded

    def _pick(self) -> tuple[int, int, _Holder] | None:
        """(first part, parts, holder) to fetch next, or None."""
        if self.crowded:
            choice = self._pick_part()
            return None if choice is None else (choice[0], 1, choice[1])
        # Alone: the lowest part we lack, then the parts after it, from a free holder.
        have, n = self.partial.have, len(self.parts)
        free = [h for h in self.holders.values()
                if not h.banned and h.polled and h.inflight < PER_IDLE_HOLDER]
        if not free:
            return None
        for index in range(n):
            if have[index] or index in self.inflight:
                continue
            holders = [h for h in free if h.have[index]]
            if not holders:
                continue
            holder = max(holders, key=lambda h: (h.throughput, self._rng.random()))
            count = 1
            while (count < MAX_RUN and index + count < n and not have[index + count]
                   and index + count not in self.inflight and holder.have[index + count]):
                count += 1
            return index, count, holder
        return None

    def _pick_part(self) -> tuple[int, _Holder] | None:
        usable = [h for h in self.holders.values() if not h.banned]
        best: tuple[int, float] | None = None
        choice: tuple[int, _Holder] | None = None
        for index, flag in enumerate(self.partial.have):
            if flag or index in self.inflight:
                continue
            holding = [h for h in usable if h.have[index]]
            free = [h for h in holding
                    if h.inflight < (PER_IDLE_HOLDER if h.others == 0 else PER_HOLDER)]
            if not free:
                continue
            # Rarest first, counting a part a holder is sending elsewhere as one more
            # holder soon; random among equals, so fetchers spread over the parts.
            soon = sum(1 for h in holding if index < len(h.sending) and h.sending[index])
            if soon and all(all(h.have) for h in free):
                # Only a holder of every part (a seeder) could send it now, and it is on
                # its way to another fetcher already: fetch it from that one, soon. A
                # seeder's upload is the swarm's scarce link: each part once, if it can.
                continue
            key = (len(holding) + soon, self._rng.random())
            if best is None or key < best:
                best = key
                # Fetchers first: their uploads are idle otherwise; a seeder's are not.
                free.sort(key=lambda h: (all(h.have), h.inflight, -h.throughput,
                                         self._rng.random()))
                choice = (index, free[0])
        return choice

    async def _fetch_run(
        self, first: int, count: int, holder: _Holder, slots: anyio.Semaphore
    ) -> None:
        """Parts ``first .. first+count-1`` from ``holder`` in one request; each part is
        checked, written and offered to others as soon as its last byte is in."""
        offset = self.parts.span(first)[0]
        last_offset, last_length = self.parts.span(first + count - 1)
        wanted = last_offset + last_length - offset
        index, end = first, first + count
        started = time.monotonic()
        try:
            client = await self.peers._client(holder.address)
            blob: PeerBlob = await client.open_blob(
                self.digest, offset=offset, length=wanted, timeout=self.peers.config.blob_timeout
            )
            body = blob.body
            buf = bytearray()
            try:
                while index < end:
                    # A holder that sends nothing for blob_timeout is given up on; a
                    # slow one (rate-limited, busy) is not.
                    with anyio.fail_after(self.peers.config.blob_timeout):
                        chunk = await anext(body, None)
                    if chunk is None:
                        raise TransportError(f"{holder.node_id[:16]} ended part {index} early")
                    buf += chunk
                    length = self.parts.span(index)[1]
                    while len(buf) >= length:
                        data = bytes(buf[:length])
                        del buf[:length]
                        # Hashed and written once, in a worker thread (the loop goes on).
                        if not await anyio.to_thread.run_sync(self.partial.check_and_put,
                                                              index, data):
                            raise PeerMisbehaved(
                                holder.node_id, f"sent a wrong part {index} of {self.digest}")
                        self.partial.mark(index)
                        self.received += length
                        self.peers.received_from(holder.node_id, length)
                        self.served_by[holder.node_id] = self.served_by.get(holder.node_id, 0) + 1
                        self.inflight.discard(index)
                        self._part_written()
                        self._wake.set()
                        index += 1
                        if index < end and count > 1 and self.crowded:
                            # Others fetch it too: give the rest of the run back, so
                            # parts go rarest first from now on.
                            end = index
                        if index == end:
                            break
                        length = self.parts.span(index)[1]
            finally:
                aclose = getattr(body, "aclose", None)
                if aclose is not None:
                    await aclose()
            rate = wanted / max(time.monotonic() - started, 1e-3)
            holder.throughput = rate if not holder.throughput else (
                0.7 * holder.throughput + 0.3 * rate)
        except PeerMisbehaved as exc:
            holder.banned = True
            self.peers._blame(holder.node_id, exc.reason)
        except (PyrsiaError, OSError, TimeoutError) as exc:
            # A holder that fails is not asked for this part again until it says it has it.
            if index < len(holder.have):
                holder.have[index] = 0
            log.debug("Part %d of %s from %s failed: %s", index, self.digest,
                      holder.node_id[:16], exc)
        finally:
            holder.inflight -= 1
            for i in range(index, first + count):
                self.inflight.discard(i)  # the parts of the run not received
            slots.release()
            self._wake.set()

    async def _announce(self) -> None:
        try:
            await self.peers.announce([self.digest])
        except PyrsiaError as exc:
            log.debug("Announcing %s failed: %s", self.digest, exc)

    # -- who holds what --------------------------------------------------------------------

    def learn(self, node_id: str, address: str) -> None:
        """A peer asked this node for parts of the blob: it fetches it too, so it will
        hold parts soon -- poll it like any holder."""
        if node_id == self.peers.node.node_id:
            return
        holder = self.holders.get(node_id)
        if holder is None:
            holder = self.holders[node_id] = _Holder(
                node_id, address, bytearray(len(self.parts)))
        holder.learned = True
        self._wake.set()

    async def _watch_holders(self) -> None:
        last_lookup = -LOOKUP_INTERVAL
        lookups = 0
        while True:
            now = time.monotonic()
            # Look providers up at once, again soon (others announce as they start),
            # then now and then.
            if now - last_lookup >= (1.0 if lookups == 1 else LOOKUP_INTERVAL):
                last_lookup = now
                lookups += 1
                try:
                    contacts = await self.peers.find_providers(self.digest)
                except PyrsiaError as exc:
                    log.debug("Provider lookup for %s failed: %s", self.digest, exc)
                    contacts = []
                # Providers that are not proven peers are only claims: a few at most.
                for c in self.peers._rank(contacts, self.digest.raw):
                    nid = c.node_id.hex()
                    if nid not in self.holders:
                        self.holders[nid] = _Holder(nid, c.address, bytearray(len(self.parts)))
            crowded = self.crowded
            async with anyio.create_task_group() as tg:
                for holder in list(self.holders.values()):
                    # A holder of every part is asked again only while others fetch the
                    # blob too: which parts it is sending (to them) is what counts then.
                    if not holder.banned and (crowded or not all(holder.have)):
                        tg.start_soon(self._poll, holder)
            self._wake.set()
            await anyio.sleep(POLL_INTERVAL)

    async def _poll(self, holder: _Holder) -> None:
        try:
            env = await self.peers.rpc(holder.address, "GET_PARTS", {"digest": str(self.digest)},
                                       {"PARTS"}, timeout=self.peers.query_timeout(holder.node_id))
        except (PyrsiaError, ValueError) as exc:
            log.debug("GET_PARTS to %s failed: %s", holder.node_id[:16], exc)
            return
        have = parse_bitmap(env.body.get("have"), len(self.parts))
        if have is None:
            self.peers._blame(holder.node_id, "sent a malformed part bitmap")
            holder.banned = True
            return
        holder.have = have
        uploads = env.body.get("uploads")
        holder.others = max(0, uploads - holder.inflight) if type(uploads) is int else 1
        holder.sending = parse_bitmap(env.body.get("sending", ""), len(self.parts)) or bytearray()
        holder.polled = time.monotonic()
        self._wake.set()  # its parts are known now, whoever else is slow to answer
