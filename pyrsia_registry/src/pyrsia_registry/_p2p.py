"""The peer-to-peer side of a node: routing, providers, ledger sync and gossip, peer fetch.

The core owns the decisions (wire format, Kademlia tables and lookups, ledger rules);
this module is the runner: it feeds frames from the transport into them, sleeps,
retries and streams. Every frame is verified (:func:`pyrsia_core._wire.open_frame`
plus a replay guard); every block is validated by the ledger before it is stored;
every blob from a peer is hashed while it streams into the blob store, which keeps
it only if it matches the digest that the log vouches for.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import anyio.abc
import attrs
from pyrsia_core._kademlia import Contact, Lookup, ProviderStore, RoutingTable
from pyrsia_core._parts import DEFAULT_PART_SIZE
from pyrsia_core._ratelimit import TokenBucket
from pyrsia_core._wire import Envelope, ReplayGuard, open_frame, seal
from pyrsia_core.errors import (
    BlockError,
    DigestMismatch,
    PeerMisbehaved,
    PyrsiaError,
    TransportError,
)
from pyrsia_core.interfaces import BlobInfo, PeerAddress, PeerBlob, PeerClient, PeerTransport

from pyrsia_core import PARTS_RECORD_TYPE, CommittedBlock, Digest, PartList, PartListError

from . import _provenance as provenance
from ._node import Node
from ._swarm import PartialBlob, SwarmFetch

__all__ = ["PeerConfig", "PeerService"]

log = logging.getLogger("pyrsia.p2p")
K = 20
ALPHA = 3
MAX_BLOCKS_PER_REPLY = 256
MAX_REPLY_BYTES = 6 * 1024 * 1024
MAX_CONSENSUS_BATCH = 64
MAX_PROVIDE_KEYS = 256
PROVIDER_TTL = 24 * 3600.0
REPUBLISH_INTERVAL = 12 * 3600.0
CHUNK = 1024 * 1024
#: A peer address: a transport URL (http://host:port, memory://name, ...), bounded.
_ADDRESS = re.compile(r"[a-z][a-z0-9+.-]{0,15}://[^\s]{1,240}")


@attrs.define
class PeerConfig:
    peers: tuple[str, ...] = ()
    listen_only: bool = False
    no_serve: bool = False
    max_upload_rate: float | None = None  # bytes per second
    public_url: str = ""
    sync_interval: float = 5.0
    rpc_timeout: float = 10.0
    blob_timeout: float = 15.0


@attrs.define
class PeerStats:
    address: str
    last_seen: float = 0.0
    inflight: int = 0  # our downloads from this peer now
    throughput: float = 0.0  # EWMA of bytes/s we got from it
    remote_uploads: int = 0  # the in-flight uploads it reported
    failures: int = 0
    misbehaved: int = 0
    public_key: str = ""


def _node_key(node_id: str) -> bytes:
    return bytes.fromhex(node_id)


@attrs.define(eq=False)
class PeerService:
    node: Node
    transport: PeerTransport
    config: PeerConfig
    table: RoutingTable = attrs.field(init=False)
    providers: ProviderStore = attrs.field(init=False)
    replay: ReplayGuard = attrs.Factory(ReplayGuard)
    stats: dict[str, PeerStats] = attrs.Factory(dict)
    uploads_inflight: int = 0
    bucket: TokenBucket | None = None
    _clients: dict[str, PeerClient] = attrs.Factory(dict)
    _seen_blocks: set[str] = attrs.Factory(set)
    _sync_lock: anyio.Lock = attrs.Factory(anyio.Lock)
    _tg: anyio.abc.TaskGroup | None = None
    _rng: random.Random = attrs.Factory(random.Random)
    #: Large blobs being fetched in parts (digest hex -> verified parts so far).
    partials: dict[str, PartialBlob] = attrs.Factory(dict)
    swarms: dict[str, SwarmFetch] = attrs.Factory(dict)
    _sending: dict[str, dict[int, int]] = attrs.Factory(dict)
    #: For /readyz: the first bootstrap is over, and the heights peers reported in the last
    #: sync round (node id -> height; peers of another network left out).
    bootstrapped: bool = False
    last_heads: dict[str, int] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        self.table = RoutingTable(_node_key(self.node.node_id), k=K)
        self.providers = ProviderStore(ttl=PROVIDER_TTL, max_per_key=K)
        if self.config.max_upload_rate:
            rate = self.config.max_upload_rate
            self.bucket = TokenBucket(rate=rate, burst=max(rate / 10, 256 * 1024))

    @property
    def address(self) -> str:
        return self.config.public_url

    def now(self) -> float:
        return self.node.clock.now()

    # ------------------------------------------------------------------ bookkeeping

    def _speaks(self, address: str) -> bool:
        """Whether a transport of this node speaks one of ``address``'s schemes."""
        speaks = getattr(self.transport, "speaks", None)
        if speaks is None or speaks(address):
            return True
        log.debug("Skipping peer address %s: no transport of this node speaks it", address)
        return False

    def _saw(self, node_id: str, address: str) -> None:
        if (
            node_id == self.node.node_id
            or not _ADDRESS.fullmatch(address)
            or not self._speaks(address)
        ):
            return
        st = self.stats.get(node_id)
        if st is None:
            st = self.stats[node_id] = PeerStats(address)
        st.address = address
        st.last_seen = self.now()
        st.failures = 0
        self.table.update(Contact(_node_key(node_id), address), self.node.clock.monotonic())
        # A full bucket keeps its least-recently-seen contact only if it still answers.
        for candidate in self.table.take_ping_candidates():
            if self._tg is not None:
                self._tg.start_soon(self._check_candidate, candidate)

    async def _check_candidate(self, candidate: Contact) -> None:
        try:
            await self.ping(candidate.address)
            alive = True
        except (PyrsiaError, ValueError):
            alive = False
        self.table.evict_or_keep(candidate, alive, self.node.clock.monotonic())

    def _failed(self, contact: Contact) -> None:
        """A query to ``contact`` failed; after three in a row it leaves the table."""
        st = self.stats.setdefault(contact.node_id.hex(), PeerStats(contact.address))
        st.failures += 1
        if st.failures >= 3:
            self.table.remove(contact.node_id)

    def _remember_key(self, env: Envelope) -> None:
        st = self.stats.get(env.sender)
        if st is not None:
            st.public_key = env.public_key.hex

    def _id_at(self, address: str) -> str:
        for nid, st in self.stats.items():
            if st.address == address:
                return nid
        return address

    def address_of(self, node_id: str) -> str | None:
        st = self.stats.get(node_id)
        return st.address if st is not None else None

    def _blame(self, node_id: str, reason: str) -> None:
        st = self.stats.get(node_id)
        if st is not None:
            st.misbehaved += 1
        log.warning("Peer %s misbehaved: %s", node_id[:16], reason)

    def peers(self) -> list[dict[str, Any]]:
        out = []
        for c in self.table.contacts():
            nid = c.node_id.hex()
            st = self.stats.get(nid)
            out.append(
                {
                    "node_id": nid,
                    "address": c.address,
                    "last_seen": int(st.last_seen) if st else None,
                    "is_build_node": nid in self.node.log_store.ledger.validators,
                }
            )
        return sorted(out, key=lambda p: p["node_id"])

    # ------------------------------------------------------------------ server side

    async def handle(self, frame: bytes) -> bytes:
        """Answer one peer request (the transport calls this)."""
        now = self.now()
        try:
            env = open_frame(frame, now=now)
            self.replay.check(env, now)
        except PeerMisbehaved as exc:
            log.warning("Rejected a peer message: %s", exc)
            return self._seal("ERROR", {"error": str(exc)[:300]})
        self._saw(env.sender, env.address)
        self._remember_key(env)
        try:
            type_, body, *attachment = await self._dispatch(env)
        except PeerMisbehaved as exc:
            self._blame(env.sender, exc.reason)
            return self._seal("ERROR", {"error": exc.reason[:300]})
        except (PyrsiaError, ValueError, KeyError, TypeError) as exc:
            log.warning("Peer %s sent a bad %s: %s", env.sender[:16], env.type, exc)
            return self._seal("ERROR", {"error": f"bad {env.type}: {str(exc)[:300]}"})
        return self._seal(type_, body, *attachment)

    def _seal(self, type_: str, body: dict[str, Any], attachment: bytes | None = None) -> bytes:
        return seal(
            self.node.signer, type_, body, address=self.address, now=self.now(),
            attachment=attachment,
        )

    def _contacts_json(self, contacts: Sequence[Contact]) -> list[dict[str, str]]:
        return [{"node_id": c.node_id.hex(), "address": c.address} for c in contacts]

    def _head(self) -> dict[str, Any]:
        ledger = self.node.log_store.ledger
        return {
            "height": ledger.height,
            "hash": ledger.head_hash,
            "genesis": ledger.genesis_hash,
            "uploads": self.uploads_inflight,
        }

    async def _dispatch(
        self, env: Envelope
    ) -> tuple[str, dict[str, Any]] | tuple[str, dict[str, Any], bytes]:
        body = env.body
        if env.type == "PING":
            return "PONG", self._head()
        if env.type == "GET_HEAD":
            return "HEAD", self._head()
        if env.type == "FIND_NODE":
            target = _key(body.get("target"))
            return "NODES", {"contacts": self._contacts_json(self.table.closest(target, K))}
        if env.type == "GET_PROVIDERS":
            key = _key(body.get("key"))
            found = self.providers.get(key, self.node.clock.monotonic())
            mine = []
            if await self.node.local_blob(Digest(key.hex())) is not None and not (
                self.config.no_serve
            ):
                mine = [{"node_id": self.node.node_id, "address": self.address}]
            return "PROVIDERS", {
                "providers": mine + self._contacts_json(found),
                "contacts": self._contacts_json(self.table.closest(key, K)),
            }
        if env.type == "ADD_PROVIDER":
            raw_keys = body["keys"] if "keys" in body else [body.get("key")]
            if not isinstance(raw_keys, list) or not 0 < len(raw_keys) <= MAX_PROVIDE_KEYS:
                raise ValueError(f"ADD_PROVIDER names 1 to {MAX_PROVIDE_KEYS} keys")
            keys = [_key(k) for k in raw_keys]  # all valid, or none is added
            now = self.node.clock.monotonic()
            for key in keys:
                self.providers.add(key, Contact(_node_key(env.sender), env.address), now,
                                   now + PROVIDER_TTL)
            return "OK", {}
        if env.type == "GET_GENESIS":
            genesis = await self.node.log_store.block(0)
            assert genesis is not None
            return "GENESIS", {"block": genesis.to_json()}
        if env.type == "GET_BLOCKS":
            start, end = body.get("start"), body.get("end")
            if type(start) is not int or type(end) is not int or start < 0 or end < start:
                raise ValueError("GET_BLOCKS needs 0 <= start <= end")
            end = min(end, start + MAX_BLOCKS_PER_REPLY)
            # The blocks travel as an attachment built from the stored bytes: no record
            # is decoded or re-encoded here; the receiver validates every block anyway.
            blob, count = await self.node.log_store.blocks_bytes(start, end, MAX_REPLY_BYTES)
            return "BLOCKS", {"count": count}, blob
        if env.type == "NEW_BLOCK":
            committed = CommittedBlock.from_json(body.get("block"))
            await self._receive_block(committed, env)
            return "OK", {}
        consensus = getattr(self.node, "consensus", None)
        if env.type == "CONSENSUS":
            if consensus is None:
                raise ValueError("this node runs no consensus")
            if env.attachment is not None:
                messages = _attached_list(env)
            else:
                messages = body.get("messages", [body.get("message")])
            if not isinstance(messages, list) or not 0 < len(messages) <= MAX_CONSENSUS_BATCH:
                raise ValueError(f"CONSENSUS carries 1 to {MAX_CONSENSUS_BATCH} messages")
            for message in messages:
                consensus.deliver(env.sender, message)
            return "OK", {}
        if env.type == "PENDING":
            if consensus is None:
                raise ValueError("this node runs no consensus")
            records = _attached_list(env) if env.attachment is not None else body.get("records")
            consensus.add_pending(records, env.sender)
            return "OK", {}
        if env.type == "GET_PARTS":
            digest = Digest.parse(str(body.get("digest")))
            swarm = self.swarms.get(digest.hex)
            if swarm is not None:
                swarm.learn(env.sender, env.address)
            sending = self._sending.get(digest.hex, {})
            return "PARTS", {
                "have": await self._have(digest),
                # Parts on their way to someone: soon held there too (fetchers then
                # prefer other rare parts, so the seeder sends each part about once).
                "sending": format(sum(1 << i for i in sending), "x") if sending else "",
                "uploads": self.uploads_inflight,
            }
        if env.type == "VOUCH":
            if consensus is None:
                raise ValueError("this node runs no consensus")
            consensus.add_vouch(body.get("records"), env.sender)
            return "OK", {}
        if env.type == "BUILD_REQUEST":
            return "BUILD_STATUS", await self.node.handle_build_request(body)
        if env.type == "GET_BUILD":
            build = self.node.builds.get(body.get("build_id"))
            if build is None:
                raise ValueError("no such build")
            return "BUILD_STATUS", self.node.build_json(build)
        raise ValueError(f"{env.type} is not a request")

    async def blob_source(self, digest: Digest, offset: int) -> PeerBlob | None:
        """What this node serves to peers: logged artifacts it holds, within its limits."""
        if self.config.no_serve:
            return None
        info = await self.node.local_blob(digest)
        if info is None:
            partial = self.partials.get(digest.hex)
            if partial is None:
                return None
            # Parts of a blob still arriving: only verified ones, from a part boundary.
            run = partial.run_from(offset)
            if run <= 0:
                return None
            return PeerBlob(size=partial.parts.size, offset=offset,
                            body=self._upload_partial(partial, offset, run))
        if not await self.node.records_for_artifact(digest):
            return None
        if offset < 0 or offset > info.size:
            return None
        return PeerBlob(
            size=info.size,
            offset=offset,
            body=self._upload(digest, offset, info.size - offset),
            path=info.path if self.bucket is None else None,
        )

    async def _have(self, digest: Digest) -> str:
        """Which parts of ``digest`` this node serves: "all", a bitmap, or "" (none)."""
        if self.config.no_serve:
            return ""
        if await self.node.local_blob(digest) is not None:
            return "all"
        partial = self.partials.get(digest.hex)
        return partial.bitmap() if partial is not None else ""

    async def _upload_partial(
        self, partial: PartialBlob, offset: int, count: int
    ) -> AsyncIterator[bytes]:
        async for piece in self._paced(partial.parts.blob, offset, partial.read(offset, count)):
            yield piece

    async def _upload(self, digest: Digest, offset: int, count: int) -> AsyncIterator[bytes]:
        async def pieces() -> AsyncIterator[bytes]:
            async for chunk in self.node.blobs.open(digest, offset=offset, length=count):
                for pos in range(0, len(chunk), 256 * 1024):
                    yield chunk[pos : pos + 256 * 1024]

        async for piece in self._paced(digest, offset, pieces()):
            yield piece

    async def _paced(
        self, digest: Digest, offset: int, pieces: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """An upload to a peer: counted (load, parts being sent), under the upload cap."""
        self.uploads_inflight += 1
        sending = self._sending_part(digest, offset, +1)
        try:
            async for piece in pieces:
                if self.bucket is not None:
                    delay = self.bucket.reserve(len(piece), self.node.clock.monotonic())
                    if delay > 0:
                        await anyio.sleep(delay)
                yield piece
        finally:
            self.uploads_inflight -= 1
            if sending:
                self._sending_part(digest, offset, -1)

    def _sending_part(self, digest: Digest, offset: int, change: int) -> bool:
        """Count uploads that start at a part boundary (a swarm fetcher's part request)."""
        if offset % DEFAULT_PART_SIZE:
            return False
        index = offset // DEFAULT_PART_SIZE
        counts = self._sending.setdefault(digest.hex, {})
        counts[index] = counts.get(index, 0) + change
        if counts[index] <= 0:
            del counts[index]
            if not counts:
                del self._sending[digest.hex]
        return True

    # ------------------------------------------------------------------ client side

    async def _client(self, address: str) -> PeerClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = await self.transport.connect(PeerAddress(address))
        return client

    async def rpc(
        self, address: str, type_: str, body: dict[str, Any], expect: set[str],
        attachment: bytes | None = None,
    ) -> Envelope:
        """Send a request and verify the signed reply (raises TransportError/PeerMisbehaved)."""
        client = await self._client(address)
        reply = await client.request(self._seal(type_, body, attachment),
                                     timeout=self.config.rpc_timeout)
        env = open_frame(reply, now=self.now(), expect=expect | {"ERROR"})
        if env.type == "ERROR":
            raise TransportError(f"{address} refused {type_}: {env.body.get('error')}")
        self._saw(env.sender, env.address or address)
        self._remember_key(env)
        if "uploads" in env.body and env.sender in self.stats:
            uploads = env.body["uploads"]
            # A peer's own word on its load, clamped: it cannot bid below zero to attract traffic.
            self.stats[env.sender].remote_uploads = (
                min(max(uploads, 0), 10_000) if type(uploads) is int else 0
            )
        return env

    async def request_build(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Send a BUILD_REQUEST to the first authorized build node that answers; its build
        status (with ``build_node``) and its address. Raises TransportError naming why
        each build node failed."""
        errors = []
        for nid in self.node.log_store.ledger.validators.ordered():
            address = self.address_of(nid)
            if address is None:
                continue
            try:
                env = await self.rpc(address, "BUILD_REQUEST", body, {"BUILD_STATUS"})
            except PyrsiaError as exc:
                errors.append(f"{nid[:16]}: {exc}")
                continue
            status = dict(env.body)
            status["build_node"] = nid
            return status, address
        raise TransportError(
            "no build node could be reached: " + ("; ".join(errors) or "none known"))

    async def ping(self, address: str) -> Envelope:
        return await self.rpc(address, "PING", {}, {"PONG"})

    async def fetch_genesis(self, addresses: Sequence[str]) -> CommittedBlock:
        """The network's genesis block from the first peer that answers."""
        errors = []
        for address in addresses:
            try:
                env = await self.rpc(address, "GET_GENESIS", {}, {"GENESIS"})
                genesis = CommittedBlock.from_json(env.body.get("block"))
                log.info("Joined network %s (genesis from %s)", genesis.block.origin, address)
                return genesis
            except (PyrsiaError, ValueError) as exc:
                errors.append(f"{address}: {exc}")
        raise TransportError("no peer gave the network's genesis: " + "; ".join(errors))

    async def lookup(self, target: bytes, kind: str = "nodes") -> Lookup:
        """Run an iterative Kademlia lookup (alpha requests in flight)."""
        seeds = self.table.closest(target, K)
        lookup = Lookup(
            target,
            seeds,
            kind=kind,  # type: ignore[arg-type]
            alpha=ALPHA,
            k=K,
            own_id=_node_key(self.node.node_id),
        )
        while not lookup.done:
            batch = lookup.next_queries()
            if not batch:
                break

            async def ask(c: Contact) -> None:
                try:
                    if kind == "providers":
                        env = await self.rpc(
                            c.address, "GET_PROVIDERS", {"key": target.hex()}, {"PROVIDERS"}
                        )
                        provs = _contacts(env.body.get("providers"))
                    else:
                        env = await self.rpc(
                            c.address, "FIND_NODE", {"target": target.hex()}, {"NODES"}
                        )
                        provs = None
                    contacts = [
                        x for x in _contacts(env.body.get("contacts")) if self._speaks(x.address)
                    ]
                    if provs is not None:
                        provs = [x for x in provs if self._speaks(x.address)]
                    lookup.on_response(c, contacts, provs)
                except (PyrsiaError, ValueError) as exc:
                    log.debug("lookup query to %s failed: %s", c.address, exc)
                    self._failed(c)
                    lookup.on_failure(c)

            async with anyio.create_task_group() as tg:
                for c in batch:
                    tg.start_soon(ask, c)
        return lookup

    async def bootstrap(self) -> None:
        """Meet the configured peers, fill the routing table, catch the ledger up."""
        for address in self.config.peers:
            try:
                await self.ping(address)
            except (PyrsiaError, ValueError) as exc:
                log.warning("Peer %s did not answer: %s", address, exc)
        if len(self.table):
            lookup = await self.lookup(_node_key(self.node.node_id))
            for c in lookup.result():
                self._saw(c.node_id.hex(), c.address)
            log.info("Bootstrapped: %d peer(s) known", len(self.table))
        await self.sync()

    async def sync(self) -> None:
        """Ask known peers for their head; fetch and validate any blocks we miss."""
        heads: dict[str, int] = {}
        for nid, st in list(self.stats.items()):
            try:
                env = await self.rpc(st.address, "GET_HEAD", {}, {"HEAD"})
            except (PyrsiaError, ValueError) as exc:
                st.failures += 1
                log.debug("head request to %s failed: %s", nid[:16], exc)
                continue
            height = env.body.get("height")
            if env.body.get("genesis") != self.node.log_store.ledger.genesis_hash:
                continue
            if type(height) is int:
                heads[nid] = height
            if type(height) is int and height > self.node.log_store.ledger.height:
                try:
                    await self.sync_from(st.address, height)
                except (PyrsiaError, ValueError) as exc:
                    st.failures += 1
                    log.warning("Ledger sync from %s failed: %s", st.address, exc)
        self.last_heads = heads

    async def sync_from(self, address: str, target: int) -> int:
        """Fetch blocks up to ``target`` from one peer, validating each; return how many.

        The next range is fetched and decoded while the current one is validated and
        stored (validation of big blocks runs in a worker thread).
        """
        added = 0
        async with self._sync_lock:
            send, receive = anyio.create_memory_object_stream[list[CommittedBlock]](1)
            failure: list[BaseException] = []

            async def fetch() -> None:
                async with send:
                    start = self.node.log_store.ledger.height + 1
                    try:
                        while start <= target:
                            env = await self.rpc(
                                address, "GET_BLOCKS", {"start": start, "end": target + 1},
                                {"BLOCKS"},
                            )
                            raw = _blocks_of(env)
                            if not raw:
                                return
                            batch = [CommittedBlock.from_json(item) for item in raw]
                            await send.send(batch)
                            start = batch[-1].block.height + 1
                    except (PyrsiaError, ValueError) as exc:
                        failure.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch)
                async with receive:
                    async for batch in receive:
                        for committed in batch:
                            if committed.block.height <= self.node.log_store.ledger.height:
                                continue
                            try:
                                await self.node.append_block(committed)
                            except BlockError as exc:
                                self._blame(self._id_at(address),
                                            f"sent an invalid block: {exc}")
                                tg.cancel_scope.cancel()
                                break
                            self._seen_blocks.add(committed.block.hash)
                            added += 1
            if failure and not added:
                raise failure[0]
        if added:
            log.info(
                "Synced %d block(s) from %s; ledger height %d",
                added,
                address,
                self.node.log_store.ledger.height,
            )
        return added

    async def _receive_block(self, committed: CommittedBlock, env: Envelope) -> None:
        block = committed.block
        if block.hash in self._seen_blocks:
            return
        ledger = self.node.log_store.ledger
        if block.height <= ledger.height:
            return
        if block.height > ledger.height + 1:
            # We missed blocks: catch up from the sender (range requests), in the background.
            if self._tg is not None:
                self._tg.start_soon(self._sync_quietly, env.address, block.height)
            return
        async with self._sync_lock:
            if self.node.log_store.ledger.height + 1 != block.height:
                return
            try:
                await self.node.append_block(committed)
            except BlockError as exc:
                raise PeerMisbehaved(env.sender, f"gossiped an invalid block: {exc}") from None
        self._seen_blocks.add(block.hash)
        log.info("Block %d from %s appended (gossip)", block.height, env.sender[:16])
        await self.gossip(committed, exclude={env.sender})

    async def _sync_quietly(self, address: str, target: int) -> None:
        try:
            await self.sync_from(address, target)
        except (PyrsiaError, ValueError) as exc:
            log.warning("Sync from %s failed: %s", address, exc)

    async def gossip(self, committed: CommittedBlock, exclude: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Send a committed block to every known peer."""
        self._seen_blocks.add(committed.block.hash)
        body = {"block": committed.to_json()}

        async def send(nid: str, address: str) -> None:
            try:
                await self.rpc(address, "NEW_BLOCK", body, {"OK"})
            except (PyrsiaError, ValueError) as exc:
                log.debug("gossip to %s failed: %s", nid[:16], exc)

        async with anyio.create_task_group() as tg:
            for c in self.table.contacts():
                nid = c.node_id.hex()
                if nid not in exclude:
                    tg.start_soon(send, nid, c.address)

    async def announce(self, digests: Sequence[Digest]) -> None:
        """Tell the peers closest to each digest that this node provides it."""
        if self.config.no_serve or not len(self.table):
            return
        # Which peers to tell about which keys: the k closest to each key. While this
        # node knows at most k peers, those are all of them, and no lookup can find
        # closer ones (the routing table's refresh finds new nodes); then each peer
        # gets one ADD_PROVIDER naming every key.
        small = len(self.table) <= K
        everyone = self.table.closest(bytes(32), K) if small else []
        tell_whom: dict[str, tuple[Contact, list[str]]] = {}
        for digest in dict.fromkeys(digests):
            key = digest.raw
            self.providers.provide(key)
            self.providers.mark_published(key, self.node.clock.monotonic())
            if small:
                targets = everyone
            else:
                lookup = await self.lookup(key)
                targets = lookup.result() or self.table.closest(key, K)
            for c in targets:
                tell_whom.setdefault(c.node_id.hex(), (c, []))[1].append(key.hex())

        async def tell(c: Contact, keys: list[str]) -> None:
            for start in range(0, len(keys), MAX_PROVIDE_KEYS):
                try:
                    await self.rpc(c.address, "ADD_PROVIDER",
                                   {"keys": keys[start : start + MAX_PROVIDE_KEYS]}, {"OK"})
                except (PyrsiaError, ValueError) as exc:
                    log.debug("ADD_PROVIDER to %s failed: %s", c.address, exc)

        async with anyio.create_task_group() as tg:
            for c, keys in tell_whom.values():
                tg.start_soon(tell, c, keys)

    async def find_providers(self, digest: Digest) -> list[Contact]:
        key = digest.raw
        found: dict[bytes, Contact] = {
            c.node_id: c for c in self.providers.get(key, self.node.clock.monotonic())
        }
        if len(self.table):
            lookup = await self.lookup(key, kind="providers")
            for c in lookup.providers():
                found.setdefault(c.node_id, c)
        found.pop(_node_key(self.node.node_id), None)
        return list(found.values())

    def _rank(self, providers: list[Contact], key: bytes) -> list[Contact]:
        """Least loaded first: in-flight transfers over measured throughput.

        Peers never measured count as fast (so they get tried and measured); ties go
        to the provider closest to the key by XOR distance, which is deterministic.
        Peers that misbehaved go last.
        """
        target = int.from_bytes(key, "big")

        def cost(c: Contact) -> tuple[int, float, int]:
            st = self.stats.get(c.node_id.hex())
            distance = c.id_int ^ target
            if st is None:
                return (0, 0.0, distance)
            load = st.inflight + st.remote_uploads + 1
            speed = st.throughput or 1e9
            return (st.misbehaved, load / speed, distance)

        return sorted(providers, key=cost)

    async def fetch(self, digest: Digest) -> BlobInfo:
        """Fetch a logged blob from peers, verified, resuming on another provider on failure.

        The bytes stream into the blob store, which hashes them and keeps the blob only
        if it matches ``digest``; nothing unverified is stored or served. A transfer
        that stalls, breaks or ends early resumes (``Range``) from the next provider.
        If the assembled bytes do not match, every contributor is suspect: each is then
        asked alone for the whole blob, so the liar is found and the blob still arrives.
        """
        parts = await self._part_list(digest)
        if parts is not None:
            return await self._swarm(digest, parts)
        providers = self._rank(await self.find_providers(digest), digest.raw)
        if not providers:
            raise TransportError(f"no peer provides {digest}")
        served_by: list[str] = []
        try:
            info = await self.node.store_stream(
                self._chain(digest, providers, served_by), digest, None
            )
        except DigestMismatch:
            suspects = list(dict.fromkeys(served_by))
            if len(suspects) == 1:
                self._blame(suspects[0], f"sent bytes for {digest} that do not match the digest")
            log.warning("Bytes for %s from %s did not match; asking each provider alone",
                        digest, ", ".join(n[:16] for n in suspects))
            info, honest = await self._fetch_strict(digest, providers, suspects)
            served_by = [honest]
        log.info(
            "Blob %s pulled from peer(s) %s (%d bytes), verified",
            digest,
            ", ".join(n[:16] for n in dict.fromkeys(served_by)),
            info.size,
        )
        provenance.note("pulled from peer " + ", ".join(dict.fromkeys(served_by)))
        if self._tg is not None:
            self._tg.start_soon(self.announce, [digest])
        return info

    async def _part_list(self, digest: Digest) -> PartList | None:
        """The logged part list of ``digest``, if it has one (fetched and verified)."""
        records = await self.node.log_store.records_for_package(PARTS_RECORD_TYPE, str(digest))
        if not records:
            return None
        doc_digest = Digest.parse("sha256:" + records[-1].signed.record.artifact_hash)
        if await self.node.local_blob(doc_digest) is None:
            await self.fetch(doc_digest)  # small: fetched whole, verified by its digest
        data = b"".join([c async for c in self.node.blobs.open(doc_digest)])
        try:
            parts = PartList.from_bytes(data, expected=doc_digest)
        except PartListError as exc:
            raise TransportError(f"the part list logged for {digest} is unusable: {exc}") from None
        if parts.blob != digest:
            raise TransportError(f"the part list logged for {digest} names {parts.blob}")
        return parts

    async def _swarm(self, digest: Digest, parts: PartList) -> BlobInfo:
        await self.node.make_room(parts.size)
        partial = PartialBlob(parts, self.node.config.data_dir / "partial" / digest.hex)
        self.partials[digest.hex] = partial
        swarm = self.swarms[digest.hex] = SwarmFetch(self, digest, parts, partial)
        try:
            info = await swarm.run()
        finally:
            del self.swarms[digest.hex]
            del self.partials[digest.hex]
            partial.close()
        provenance.note("pulled from peer " + ", ".join(swarm.served_by))
        return info

    async def _fetch_strict(
        self, digest: Digest, providers: list[Contact], suspects: list[str]
    ) -> tuple[BlobInfo, str]:
        order = [c for c in providers if c.node_id.hex() not in suspects] + [
            c for c in providers if c.node_id.hex() in suspects
        ]
        for c in order:
            nid = c.node_id.hex()
            served: list[str] = []
            try:
                info = await self.node.store_stream(
                    self._chain(digest, [c], served), digest, None
                )
            except DigestMismatch:
                self._blame(nid, f"sent bytes for {digest} that do not match the digest")
                continue
            except TransportError:
                continue
            return info, nid
        raise TransportError(f"no provider sent the right bytes for {digest}")

    async def _chain(
        self, digest: Digest, providers: list[Contact], served_by: list[str]
    ) -> AsyncIterator[bytes]:
        """The blob's bytes from ``providers`` in turn, resuming where the last one stopped."""
        received = 0
        size: int | None = None
        for c in providers:
            nid = c.node_id.hex()
            st = self.stats.setdefault(nid, PeerStats(c.address))
            st.inflight += 1
            started, got = time.monotonic(), 0
            try:
                client = await self._client(c.address)
                blob = await client.open_blob(
                    digest, offset=received, timeout=self.config.blob_timeout
                )
                if blob.size is not None:
                    if size is None:
                        size = blob.size
                        await self.node.make_room(blob.size)
                    elif blob.size != size:
                        self._blame(nid, f"announced {blob.size} bytes for {digest}, not {size}")
                        continue
                served_by.append(nid)
                async for chunk in blob.body:
                    received += len(chunk)
                    got += len(chunk)
                    if size is not None and received > size:
                        raise PeerMisbehaved(nid, f"sent more than {size} bytes")
                    yield chunk
                if size is None or received >= size:
                    return
                raise TransportError(f"{c.address} ended {digest} early at byte {received}")
            except (TransportError, PeerMisbehaved, OSError) as exc:
                st.failures += 1
                if isinstance(exc, PeerMisbehaved):
                    self._blame(nid, exc.reason)
                log.warning(
                    "Peer %s failed while sending %s at byte %d (%s); resuming from the next "
                    "provider",
                    nid[:16],
                    digest,
                    received,
                    exc,
                )
            finally:
                st.inflight -= 1
                elapsed = max(time.monotonic() - started, 1e-3)
                if got:
                    rate = got / elapsed
                    old = st.throughput
                    st.throughput = rate if not old else 0.7 * old + 0.3 * rate
        raise TransportError(f"every provider of {digest} failed")

    # ------------------------------------------------------------------ background

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Bootstrap, then keep the ledger current and the tables fresh until cancelled."""
        # Parts of blobs a previous run was fetching when it stopped: never verified as a
        # whole, not in the store; a new fetch starts over.
        leftovers = self.node.config.data_dir / "partial"
        if leftovers.is_dir():
            for path in leftovers.iterdir():
                path.unlink(missing_ok=True)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            if not self.config.listen_only:
                try:
                    await self.bootstrap()
                except (PyrsiaError, ValueError) as exc:
                    log.warning("Bootstrap incomplete: %s", exc)
            self.bootstrapped = True
            while True:
                await anyio.sleep(self.config.sync_interval)
                try:
                    for address in self.config.peers:
                        if not any(s.address == address for s in self.stats.values()):
                            await self.ping(address)
                except (PyrsiaError, ValueError):
                    pass
                try:
                    await self.sync()
                except (PyrsiaError, ValueError) as exc:
                    log.warning("Ledger sync failed: %s", exc)
                self.replay.expire(self.now())
                await self._republish()

    async def _republish(self) -> None:
        """Re-announce what this node provides before the records expire elsewhere."""
        now = self.node.clock.monotonic()
        self.providers.expire(now)
        due = self.providers.due_for_republish(now, _node_key(self.node.node_id),
                                               REPUBLISH_INTERVAL)
        await self.announce([Digest(key.hex()) for key in due[:256]])

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def _attached_list(env: Envelope) -> list[Any]:
    """The JSON list a message carries in its attachment (its body says how long)."""
    if env.attachment is None:
        raise PeerMisbehaved(env.sender, f"{env.type} without its attachment")
    try:
        raw = json.loads(env.attachment)
    except (ValueError, RecursionError):
        raise PeerMisbehaved(env.sender, f"{env.type} attachment is not JSON") from None
    if not isinstance(raw, list) or len(raw) != env.body.get("count"):
        raise PeerMisbehaved(env.sender, f"{env.type} attachment is not the announced list")
    return raw


def _blocks_of(env: Envelope) -> list[Any]:
    """The committed blocks (as JSON) a BLOCKS reply carries in its attachment."""
    return _attached_list(env)


def _key(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) != 64:
        raise ValueError("a key is 64 hex characters")
    return bytes.fromhex(value)


def _contacts(value: Any) -> list[Contact]:
    out: list[Contact] = []
    if not isinstance(value, list):
        return out
    for item in value[: 2 * K]:
        if not isinstance(item, dict):
            continue
        nid, address = item.get("node_id"), item.get("address")
        if (
            isinstance(nid, str)
            and len(nid) == 64
            and isinstance(address, str)
            and _ADDRESS.fullmatch(address)
        ):
            try:
                out.append(Contact(bytes.fromhex(nid), address))
            except ValueError:
                continue
    return out
