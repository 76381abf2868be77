"""The peer-to-peer side of a node: routing, providers, ledger sync and gossip, peer fetch.

The core owns the decisions (wire format, Kademlia tables and lookups, ledger rules);
this module is the runner: it feeds frames from the transport into them, sleeps,
retries and streams. Every frame is verified (:func:`pyrsia_core._wire.open_frame`
plus a replay guard); every block is validated by the ledger before it is stored;
every blob from a peer is hashed while it streams into the blob store, which keeps
it only if it matches the digest that the log vouches for.

Who counts as a peer: a node id is *proven* at an address once a request this node
sent there was answered by a reply signed with that id's key. Only proven peers enter
the routing table, are handed on in ``NODES`` replies, are polled, synced from and
listed; a signed request from a node not proven (or from a new address) only makes this
node check the address, once, within a budget per address and overall. Peers that stop
answering leave the table after :data:`PEER_FAILURES` failed queries in a row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Container, Sequence
from typing import Any
from urllib.parse import urlsplit

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

from pyrsia_core import (
    PARTS_RECORD_TYPE,
    CommittedBlock,
    Digest,
    PartList,
    PartListError,
    provenance,
)

from ._node import Node
from ._receiving import Receiving
from ._swarm import PartialBlob, SwarmFetch
from ._transports import split_address

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
#: Provider records held in all, and naming one announcing node (~700 bytes each in RSS:
#: some 70 MB at the cap, measured with 2,000 ADD_PROVIDERs of 256 keys from 256 keys).
MAX_PROVIDER_RECORDS = 100_000
MAX_RECORDS_PER_PROVIDER = 10_000
#: Failed queries in a row (pings, heads, lookups) after which a peer leaves the table,
#: and seconds without news from a peer after which it leaves anyway.
PEER_FAILURES = 3
PEER_EXPIRY = 600
#: Checking that an address answers as the node id that claimed it: seconds to answer,
#: checks in flight at once, checks of one (id, address) at most every VERIFY_RETRY s,
#: and of one address (any ids) at most ADDRESS_CHECKS per ADDRESS_WINDOW s.
VERIFY_TIMEOUT = 3.0
MAX_VERIFYING = 16
VERIFY_RETRY = 5.0
ADDRESS_CHECKS = 8
ADDRESS_WINDOW = 60.0
#: Proven node ids kept at one host:port, and in all (the routing table holds fewer).
MAX_IDS_PER_HOST = 2
MAX_PEERS = 1024
#: Stats kept for nodes never proven (providers named by records, say); oldest go first.
MAX_STRANGERS = 1024
#: Peer clients kept open (one per address); the least recently used is closed first.
MAX_CLIENTS = 512
#: Seconds a peer gets to answer GET_HEAD in a sync round, and one sync attempt in all.
HEAD_TIMEOUT = 5.0
SYNC_ATTEMPT_TIMEOUT = 30.0
#: Blob fetches: seconds a provider never proven to serve gets to answer (first byte);
#: the next provider is asked too after HEDGE_DELAY s without an answer; at most
#: MAX_UNPROVEN_PROVIDERS providers that are not proven peers are tried per fetch.
OPEN_TIMEOUT = 3.0
HEDGE_DELAY = 0.5
MAX_UNPROVEN_PROVIDERS = 8
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
    failures: int = 0  # failed queries in a row
    misbehaved: int = 0
    public_key: str = ""
    #: It answered at ``address`` with a reply signed by its key (see the module doc).
    proven: bool = False
    served: int = 0  # blob transfers it completed for us
    sync_failures: int = 0  # sync attempts from it that failed, in a row
    bytes_in: int = 0  # blob bytes received from it


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
    #: Other heads at this node's height already fetched for the witness checks.
    _compared_heads: set[str] = attrs.Factory(set)
    _sync_lock: anyio.Lock = attrs.Factory(anyio.Lock)
    _tg: anyio.abc.TaskGroup | None = None
    _rng: random.Random = attrs.Factory(random.Random)
    #: Large blobs being fetched in parts (digest hex -> verified parts so far).
    partials: dict[str, PartialBlob] = attrs.Factory(dict)
    swarms: dict[str, SwarmFetch] = attrs.Factory(dict)
    _sending: dict[str, dict[int, int]] = attrs.Factory(dict)
    #: Address checks: in flight (id, address); last try per (id, address); recent
    #: tries per address.
    _verifying: set[tuple[str, str]] = attrs.Factory(set)
    _tried: dict[tuple[str, str], float] = attrs.Factory(dict)
    _address_checks: dict[str, list[float]] = attrs.Factory(dict)
    _catching_up: bool = False
    _rejected_second: int = 0
    _rejected_logged: int = 0
    #: For /readyz: the first bootstrap is over, and the heights peers reported in the last
    #: sync round (node id -> height; peers of another network left out).
    bootstrapped: bool = False
    last_heads: dict[str, int] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        self.table = RoutingTable(_node_key(self.node.node_id), k=K)
        self.providers = ProviderStore(
            ttl=PROVIDER_TTL, max_per_key=K, max_records=MAX_PROVIDER_RECORDS,
            max_per_provider=MAX_RECORDS_PER_PROVIDER,
        )
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

    def _usable(self, node_id: str, address: str) -> bool:
        return (
            node_id != self.node.node_id
            and bool(_ADDRESS.fullmatch(address))
            and self._speaks(address)
        )

    def _stats_for(self, node_id: str, address: str) -> PeerStats:
        """The stats of ``node_id``, made if new; at most MAX_STRANGERS of nodes not proven."""
        st = self.stats.get(node_id)
        if st is None:
            st = self.stats[node_id] = PeerStats(address)
            strangers = [nid for nid, s in self.stats.items() if not s.proven]
            if len(strangers) > MAX_STRANGERS:
                for nid in strangers[: len(strangers) - MAX_STRANGERS]:
                    if nid != node_id:
                        del self.stats[nid]
        return st

    def _proved(self, node_id: str, address: str) -> None:
        """``address`` answered a request of ours with a reply signed by ``node_id``."""
        if not self._usable(node_id, address):
            return
        st = self._stats_for(node_id, address)
        news = not st.proven or st.address != address
        st.address = address
        st.proven = True
        st.last_seen = self.now()
        st.failures = 0
        self.table.update(Contact(_node_key(node_id), address), self.node.clock.monotonic())
        # A full bucket keeps its least-recently-seen contact only if it still answers.
        for candidate in self.table.take_ping_candidates():
            if self._tg is not None:
                self._tg.start_soon(self._check_candidate, candidate)
        if news:
            self._cap_peers(node_id, address)

    def _cap_peers(self, node_id: str, address: str) -> None:
        """At most MAX_IDS_PER_HOST proven ids at one host and port (ids are free, hosts are
        not), and at most MAX_PEERS proven in all: the least recently seen go first,
        build nodes and routing-table contacts last."""
        where = _authority(address)
        same = [nid for nid, st in self.stats.items()
                if st.proven and _authority(st.address) == where]
        validators = self._validators()
        by_age = sorted(same, key=lambda nid: (nid in validators, self.stats[nid].last_seen))
        for nid in by_age[: max(len(same) - MAX_IDS_PER_HOST, 0)]:
            if nid != node_id:
                self._forget(nid)
        proven = [nid for nid, st in self.stats.items() if st.proven]
        if len(proven) > MAX_PEERS:
            proven.sort(key=lambda nid: (nid in validators, _node_key(nid) in self.table,
                                         self.stats[nid].last_seen))
            for nid in proven[: len(proven) - MAX_PEERS]:
                if nid != node_id:
                    self._forget(nid)

    def expire_peers(self) -> int:
        """Forget proven peers not heard from for PEER_EXPIRY s (those a sync round polls
        leave earlier, after PEER_FAILURES failed heads); returns how many."""
        cutoff = self.now() - PEER_EXPIRY
        stale = [nid for nid, st in self.stats.items() if st.proven and st.last_seen < cutoff]
        for nid in stale:
            log.info("Peer %s not heard from for %d s; dropped", nid[:16], PEER_EXPIRY)
            self._forget(nid)
        return len(stale)

    def _validators(self) -> Container[str]:
        """The build nodes' ids (none for a service that holds no ledger yet)."""
        log_store = getattr(self.node, "log_store", None)
        return log_store.ledger.validators if log_store is not None else ()

    def _polled(self) -> list[tuple[str, PeerStats]]:
        """The peers a sync round asks: routing-table contacts and build nodes, proven."""
        validators = self._validators()
        return [(nid, st) for nid, st in list(self.stats.items())
                if st.proven and (_node_key(nid) in self.table or nid in validators)]

    async def _heard(self, env: Envelope) -> None:
        """A verified request from ``env.sender``: fresh news of a proven peer at its proven
        address; anything else is only a claim, checked by contacting the address."""
        st = self.stats.get(env.sender)
        if st is not None and st.proven and env.address in (st.address, ""):
            st.last_seen = self.now()
            self.table.update(Contact(_node_key(env.sender), st.address),
                              self.node.clock.monotonic())
            for candidate in self.table.take_ping_candidates():
                if self._tg is not None:
                    self._tg.start_soon(self._check_candidate, candidate)
            return
        if env.type == "GET_GENESIS":
            return  # a node joining: not a member yet (and often not listening yet)
        await self._verify_soon(env.sender, env.address)

    async def _verify_soon(self, node_id: str, address: str) -> None:
        """Check, in the background and within budget, that ``address`` is ``node_id``."""
        if not self._usable(node_id, address):
            return
        now = self.node.clock.monotonic()
        pair = (node_id, address)
        if pair in self._verifying or len(self._verifying) >= MAX_VERIFYING:
            return
        last = self._tried.get(pair)
        if last is not None and now - last < VERIFY_RETRY:
            return
        where = _authority(address)  # paths and ids vary for free; the host does not
        recent = [t for t in self._address_checks.get(where, ()) if now - t < ADDRESS_WINDOW]
        if len(recent) >= ADDRESS_CHECKS:
            return
        recent.append(now)
        self._address_checks[where] = recent
        self._tried[pair] = now
        while len(self._tried) > 4096:
            del self._tried[next(iter(self._tried))]
        while len(self._address_checks) > 4096:
            del self._address_checks[next(iter(self._address_checks))]
        self._verifying.add(pair)
        if self._tg is not None:
            self._tg.start_soon(self._verify, node_id, address)
        else:  # not running (an embedded service, tests): check before answering
            await self._verify(node_id, address)

    async def _verify(self, node_id: str, address: str) -> None:
        try:
            env = await self.rpc(address, "PING", {}, {"PONG"}, timeout=VERIFY_TIMEOUT)
            if env.sender != node_id:
                log.debug("%s answered as %s, not as %s", address, env.sender[:16], node_id[:16])
        except (PyrsiaError, ValueError) as exc:
            log.debug("Peer %s at %s did not answer: %s", node_id[:16], address, exc)
        finally:
            self._verifying.discard((node_id, address))

    def proven(self, node_id: str) -> bool:
        """Whether ``node_id`` proved its key: an address answered a request of ours with a
        reply signed by it (so its public key here is its own)."""
        st = self.stats.get(node_id)
        return st is not None and st.proven

    async def _check_candidate(self, candidate: Contact) -> None:
        try:
            await self.ping(candidate.address, sender=candidate.node_id.hex())
            alive = True
        except (PyrsiaError, ValueError):
            alive = False
        self.table.evict_or_keep(candidate, alive, self.node.clock.monotonic())
        if not alive:
            self._forget(candidate.node_id.hex())

    def _failed(self, node_id: str) -> None:
        """A query to ``node_id`` failed; after PEER_FAILURES in a row it is dropped."""
        st = self.stats.get(node_id)
        if st is None:
            return
        st.failures += 1
        if st.failures >= PEER_FAILURES:
            if st.proven:
                log.info("Peer %s at %s stopped answering; dropped", node_id[:16], st.address)
            self._forget(node_id)

    def _forget(self, node_id: str) -> None:
        """Out of the table, no longer proven (it proves itself again by answering)."""
        self.table.remove(_node_key(node_id))
        st = self.stats.get(node_id)
        if st is not None:
            st.proven = False

    def _remember_key(self, env: Envelope) -> None:
        st = self.stats.get(env.sender)
        if st is not None:
            st.public_key = env.public_key.hex

    def _id_at(self, address: str) -> str:
        for nid, st in self.stats.items():
            if st.proven and st.address == address:
                return nid
        return address

    def address_of(self, node_id: str) -> str | None:
        """Where ``node_id`` answered as itself (``None``: nowhere yet)."""
        st = self.stats.get(node_id)
        return st.address if st is not None and st.proven else None

    def received_from(self, node_id: str, count: int) -> None:
        """Count ``count`` verified bytes received from peer ``node_id`` (swarm parts)."""
        st = self.stats.get(node_id)
        if st is not None:
            st.bytes_in += count

    def _blame(self, node_id: str, reason: str, kind: str = "peer_misbehaved") -> None:
        st = self.stats.get(node_id)
        if st is not None:
            st.misbehaved += 1
        self.node.activity.failure(kind, f"peer {node_id}", reason)
        log.warning("Peer %s misbehaved: %s", node_id[:16], reason)

    def peers(self) -> list[dict[str, Any]]:
        """The peers in the routing table (every one proven), with when last heard from
        (``last_seen``: Unix seconds; ``last_seen_ago``: seconds since)."""
        out = []
        now = self.now()
        for c in self.table.contacts():
            nid = c.node_id.hex()
            st = self.stats.get(nid)
            out.append(
                {
                    "node_id": nid,
                    "address": c.address,
                    "last_seen": int(st.last_seen) if st else None,
                    "last_seen_ago": round(max(now - st.last_seen, 0.0), 1) if st else None,
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
            self.replay.check(env, now, trusted=self.proven(env.sender))
        except PeerMisbehaved as exc:
            # A flood of bad frames must not become a flood of log lines: 20 a second.
            second = int(self.node.clock.monotonic())
            if second != self._rejected_second:
                self._rejected_second, self._rejected_logged = second, 0
            self._rejected_logged += 1
            level = logging.WARNING if self._rejected_logged <= 20 else logging.DEBUG
            log.log(level, "Rejected a peer message: %s", exc)
            return self._seal("ERROR", {"error": str(exc)[:300]})
        await self._heard(env)
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
            build = self.node.builds.get(str(body.get("build_id")))
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
            self.node.activity.uploading(run)
            return PeerBlob(size=partial.parts.size, offset=offset,
                            body=self._upload_partial(partial, offset, run))
        if not await self.node.records_for_artifact(digest):
            return None
        if offset < 0 or offset > info.size:
            return None
        self.node.activity.uploading(info.size - offset)
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
                        self.node.activity.upload_waited(delay)
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
        client = self._clients.pop(address, None)
        if client is None:
            client = await self.transport.connect(PeerAddress(address))
            while len(self._clients) >= MAX_CLIENTS:
                old = self._clients.pop(next(iter(self._clients)))
                with anyio.CancelScope(shield=True):
                    await old.aclose()
        self._clients[address] = client  # now the most recently used
        return client

    async def rpc(
        self, address: str, type_: str, body: dict[str, Any], expect: set[str],
        attachment: bytes | None = None, *, timeout: float | None = None,  # noqa: ASYNC109
        sender: str | None = None,
    ) -> Envelope:
        """Send a request and verify the signed reply (raises TransportError/PeerMisbehaved).

        The replier is proven at ``address`` (see the module doc). With ``sender``, a
        reply signed by another node is refused (TransportError).
        """
        client = await self._client(address)
        seconds = timeout or self.config.rpc_timeout
        try:
            # The transport bounds it too; this holds even for one that does not.
            with anyio.fail_after(seconds + 1):
                reply = await client.request(self._seal(type_, body, attachment),
                                             timeout=seconds)
        except TimeoutError:
            raise TransportError(f"{address} did not reply within {seconds:g} s") from None
        env = open_frame(reply, now=self.now(), expect=expect | {"ERROR"})
        # Its own listed address if it answered at one of them, else where it answered.
        claimed = env.address
        at = claimed if claimed and address in split_address(claimed) else address
        self._proved(env.sender, at)
        self._remember_key(env)
        if sender is not None and env.sender != sender:
            raise TransportError(f"{address} answered as {env.sender[:16]}, not {sender[:16]}")
        if env.type == "ERROR":
            raise TransportError(f"{address} refused {type_}: {env.body.get('error')}")
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

    async def ping(self, address: str, *, sender: str | None = None) -> Envelope:
        return await self.rpc(address, "PING", {}, {"PONG"}, sender=sender)

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
                    # A contact someone else named counts only if it answers as itself.
                    if kind == "providers":
                        env = await self.rpc(
                            c.address, "GET_PROVIDERS", {"key": target.hex()}, {"PROVIDERS"},
                            sender=c.node_id.hex(),
                        )
                        provs = _contacts(env.body.get("providers"))
                    else:
                        env = await self.rpc(
                            c.address, "FIND_NODE", {"target": target.hex()}, {"NODES"},
                            sender=c.node_id.hex(),
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
                    self._failed(c.node_id.hex())
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
            # Every contact that answered the lookup is in the table now (proven by rpc).
            await self.lookup(_node_key(self.node.node_id))
            log.info("Bootstrapped: %d peer(s) known", len(self.table))
        await self.sync()

    async def sync(self) -> None:
        """Ask proven peers for their head (at once, briefly); catch up from those ahead.

        Peers whose sync attempts failed are tried last; each attempt is bounded in time
        (SYNC_ATTEMPT_TIMEOUT), so a peer that claims a height it does not serve costs one
        bounded attempt per round, never the whole sync.
        """
        ledger = self.node.log_store.ledger
        heights: dict[str, int] = {}
        hashes: dict[str, Any] = {}
        limiter = anyio.CapacityLimiter(16)

        async def head(nid: str, st: PeerStats) -> None:
            async with limiter:
                try:
                    env = await self.rpc(st.address, "GET_HEAD", {}, {"HEAD"},
                                         timeout=min(HEAD_TIMEOUT, self.config.rpc_timeout),
                                         sender=nid)
                except (PyrsiaError, ValueError) as exc:
                    log.debug("head request to %s failed: %s", nid[:16], exc)
                    self._failed(nid)
                    return
            height = env.body.get("height")
            if env.body.get("genesis") == ledger.genesis_hash and type(height) is int:
                heights[nid] = height
                hashes[nid] = env.body.get("hash")

        async with anyio.create_task_group() as tg:
            for nid, st in self._polled():
                tg.start_soon(head, nid, st)
        self.last_heads = dict(heights)
        ahead = [nid for nid, h in heights.items() if h > self.node.log_store.ledger.height]
        ahead.sort(key=lambda nid: (self.stats[nid].sync_failures, -heights[nid]))
        for nid in ahead:
            if heights[nid] <= self.node.log_store.ledger.height:
                continue
            await self._sync_bounded(nid, heights[nid])
        await self._compare_heads(heights, hashes)

    async def _compare_heads(self, heights: dict[str, int], hashes: dict[str, Any]) -> None:
        """A peer whose head is at this node's height with another hash: fetch that block
        once, for the witness checks (split-view evidence if it is certified)."""
        ledger = self.node.log_store.ledger
        witnesses = self.node.witnesses
        if witnesses is None:
            return
        for nid, height in heights.items():
            other = hashes.get(nid)
            st = self.stats.get(nid)
            if (height != ledger.height or not isinstance(other, str) or other == ledger.head_hash
                    or other in self._seen_blocks or other in self._compared_heads
                    or st is None or len(self._compared_heads) >= 10_000):
                continue
            self._compared_heads.add(other)  # asked once
            try:
                with anyio.move_on_after(SYNC_ATTEMPT_TIMEOUT):
                    env = await self.rpc(st.address, "GET_BLOCKS",
                                         {"start": height, "end": height + 1}, {"BLOCKS"},
                                         sender=nid)
                    for item in _blocks_of(env)[:1]:
                        await witnesses.observe(CommittedBlock.from_json(item))
            except (PyrsiaError, ValueError) as exc:
                log.debug("fetching the other head of %s failed: %s", nid[:16], exc)

    async def _sync_bounded(self, node_id: str, target: int) -> bool:
        """One sync attempt from a proven peer, bounded in time; whether it added blocks."""
        st = self.stats.get(node_id)
        if st is None or not st.proven:
            return False
        added = 0
        with anyio.move_on_after(SYNC_ATTEMPT_TIMEOUT) as scope:
            try:
                added = await self.sync_from(st.address, target, node_id=node_id)
            except (PyrsiaError, ValueError) as exc:
                log.warning("Ledger sync from %s failed: %s", st.address, exc)
        if scope.cancelled_caught:
            log.warning("Ledger sync from %s took over %g s; stopped", st.address,
                        SYNC_ATTEMPT_TIMEOUT)
        st.sync_failures = 0 if added else st.sync_failures + 1
        return added > 0

    async def sync_from(self, address: str, target: int, *, node_id: str | None = None) -> int:
        """Fetch blocks up to ``target`` from one peer, validating each; return how many.

        The next range is fetched and decoded while the current one is validated and
        stored (validation of big blocks runs in a worker thread). The sync lock is held
        only while blocks are appended, never while waiting for the peer.
        """
        added = 0
        blame = node_id or self._id_at(address)
        send, receive = anyio.create_memory_object_stream[list[CommittedBlock]](1)
        failure: list[BaseException] = []

        async def fetch() -> None:
            async with send:
                start = self.node.log_store.ledger.height + 1
                try:
                    while start <= target:
                        env = await self.rpc(
                            address, "GET_BLOCKS", {"start": start, "end": target + 1},
                            {"BLOCKS"}, sender=node_id,
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
                    bad = False
                    async with self._sync_lock:
                        # With a witness policy: only blocks a witnessed checkpoint covers.
                        witnesses = self.node.witnesses
                        for committed in (batch if witnesses is None
                                          else witnesses.covered(batch)):
                            if committed.block.height <= self.node.log_store.ledger.height:
                                continue
                            try:
                                await self.node.append_block(committed, covered=True)
                            except BlockError as exc:
                                if committed.block.height <= self.node.log_store.ledger.height:
                                    continue  # committed here meanwhile (own consensus)
                                self._blame(blame, f"sent an invalid block: {exc}")
                                bad = True
                                break
                            self._seen_blocks.add(committed.block.hash)
                            added += 1
                    if bad:
                        tg.cancel_scope.cancel()
                        break
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
            if self.node.witnesses is not None:
                # The same block (more cosignatures), or another one: a split view.
                await self.node.witnesses.observe(committed)
            return
        if block.height > ledger.height + 1:
            # We missed blocks: catch up from the sender (range requests), in the background
            # -- if it is a proven peer, the block's certificate is signed by a quorum of
            # the build nodes we know, and no catch-up is running already.
            if not self.proven(env.sender) or self._catching_up or self._tg is None:
                return
            try:
                ledger.check_certificate(committed)
            except BlockError as exc:
                # Possibly honest (the build nodes changed in between): the periodic sync
                # catches up from heads; nothing is fetched on this block's word.
                log.info("Far-ahead block %d from %s not certified by our build nodes: %s",
                         block.height, env.sender[:16], exc)
                return
            self._catching_up = True
            self._tg.start_soon(self._catch_up, env.sender, block.height)
            return
        try:  # the cheap check first: a quorum of the build nodes signed it
            ledger.check_certificate(committed)
        except BlockError as exc:
            raise PeerMisbehaved(env.sender, f"gossiped an invalid block: {exc}") from None
        async with self._sync_lock:
            if self.node.log_store.ledger.height + 1 != block.height:
                return
            try:
                await self.node.append_block(committed)
            except BlockError as exc:
                if exc.rule == "witness":  # honest, maybe: witnesses slow or down
                    log.info("Block %d from %s not adopted: %s", block.height,
                             env.sender[:16], exc)
                    return
                if block.height <= self.node.log_store.ledger.height:
                    return  # committed here meanwhile (own consensus): as for an old block
                raise PeerMisbehaved(env.sender, f"gossiped an invalid block: {exc}") from None
        self._seen_blocks.add(block.hash)
        log.info("Block %d from %s appended (gossip)", block.height, env.sender[:16])
        await self.gossip(committed, exclude={env.sender})

    async def _catch_up(self, node_id: str, target: int) -> None:
        try:
            await self._sync_bounded(node_id, target)
        finally:
            self._catching_up = False

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
        """Providers of ``digest``: records held here and found by a lookup. A provider
        that is a proven peer is reached at its proven address (a record's own address is
        only what its announcer claimed)."""
        key = digest.raw
        found: dict[bytes, Contact] = {
            c.node_id: c for c in self.providers.get(key, self.node.clock.monotonic())
        }
        if len(self.table):
            lookup = await self.lookup(key, kind="providers")
            for c in lookup.providers():
                found.setdefault(c.node_id, c)
        found.pop(_node_key(self.node.node_id), None)
        out = []
        for nid, c in found.items():
            address = self.address_of(nid.hex())
            out.append(c if address is None or address == c.address else Contact(nid, address))
        return out

    def _rank(self, providers: list[Contact], key: bytes) -> list[Contact]:
        """Proven peers that served before, then other proven peers, then at most
        MAX_UNPROVEN_PROVIDERS others (named by records only); peers that misbehaved last.

        Within a class, least loaded first: in-flight transfers over measured throughput
        (peers never measured count as fast, so they get tried and measured); ties go to
        the provider closest to the key by XOR distance, which is deterministic.
        """
        target = int.from_bytes(key, "big")

        def cost(c: Contact) -> tuple[int, int, float, int]:
            st = self.stats.get(c.node_id.hex())
            distance = c.id_int ^ target
            if st is None:
                return (0, 2, 0.0, distance)
            trust = 0 if st.proven and (st.served or st.throughput) else 1 if st.proven else 2
            load = st.inflight + st.remote_uploads + 1
            speed = st.throughput or 1e9
            return (st.misbehaved, trust, load / speed, distance)

        ranked = sorted(providers, key=cost)
        unproven = [c for c in ranked if not self.proven(c.node_id.hex())]
        skip = {c.node_id for c in unproven[MAX_UNPROVEN_PROVIDERS:]}
        return [c for c in ranked if c.node_id not in skip]

    async def fetch(
        self, digest: Digest, *, on_receiving: Callable[[Receiving], None] | None = None
    ) -> BlobInfo:
        """Fetch a logged blob from peers, verified, resuming on another provider on failure.

        The bytes stream into the blob store, which hashes them and keeps the blob only
        if it matches ``digest``; nothing unverified is stored or served. A transfer
        that stalls, breaks or ends early resumes (``Range``) from the next provider.
        If the assembled bytes do not match, every contributor is suspect: each is then
        asked alone for the whole blob, so the liar is found and the blob still arrives.
        """
        parts = await self._part_list(digest)
        if parts is not None:
            return await self._swarm(digest, parts, on_receiving)
        providers = self._rank(await self.find_providers(digest), digest.raw)
        if not providers:
            raise TransportError(f"no peer provides {digest}")
        served_by: list[str] = []
        try:
            info = await self.node.store_stream(
                self._chain(digest, providers, served_by), digest, None,
                on_receiving=on_receiving,
            )
        except DigestMismatch:
            suspects = list(dict.fromkeys(served_by))
            if len(suspects) == 1:
                self._blame(suspects[0], f"sent bytes for {digest} that do not match the digest",
                            "digest_mismatch")
            log.warning("Bytes for %s from %s did not match; asking each provider alone",
                        digest, ", ".join(n[:16] for n in suspects))
            info, honest = await self._fetch_strict(digest, providers, suspects, on_receiving)
            served_by = [honest]
        log.info(
            "Blob %s pulled from peer(s) %s (%d bytes), verified",
            digest,
            ", ".join(n[:16] for n in dict.fromkeys(served_by)),
            info.size,
        )
        provenance.note("pulled from peer " + ", ".join(dict.fromkeys(served_by)), info.size)
        if self._tg is not None:
            with contextlib.suppress(RuntimeError):  # the node is stopping
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

    async def _swarm(
        self, digest: Digest, parts: PartList,
        on_receiving: Callable[[Receiving], None] | None = None,
    ) -> BlobInfo:
        await self.node.make_room(parts.size)
        partial = PartialBlob(parts, self.node.config.data_dir / "partial" / digest.hex)
        self.partials[digest.hex] = partial
        swarm = self.swarms[digest.hex] = SwarmFetch(self, digest, parts, partial,
                                                     on_receiving=on_receiving)
        try:
            info = await swarm.run()
        finally:
            del self.swarms[digest.hex]
            del self.partials[digest.hex]
            partial.close()
        provenance.note("pulled from peer " + ", ".join(swarm.served_by), info.size)
        return info

    async def _fetch_strict(
        self, digest: Digest, providers: list[Contact], suspects: list[str],
        on_receiving: Callable[[Receiving], None] | None = None,
    ) -> tuple[BlobInfo, str]:
        order = [c for c in providers if c.node_id.hex() not in suspects] + [
            c for c in providers if c.node_id.hex() in suspects
        ]
        for c in order:
            nid = c.node_id.hex()
            served: list[str] = []
            try:
                info = await self.node.store_stream(
                    self._chain(digest, [c], served), digest, None, on_receiving=on_receiving
                )
            except DigestMismatch:
                self._blame(nid, f"sent bytes for {digest} that do not match the digest",
                            "digest_mismatch")
                continue
            except TransportError:
                continue
            return info, nid
        raise TransportError(f"no provider sent the right bytes for {digest}")

    def _open_timeout(self, c: Contact) -> float:
        """Seconds ``c`` gets to answer a blob request: a proven peer gets the blob
        timeout; a provider named only by records OPEN_TIMEOUT (a tarpit costs that)."""
        if self.proven(c.node_id.hex()):
            return self.config.blob_timeout
        return min(OPEN_TIMEOUT, self.config.blob_timeout)

    def query_timeout(self, node_id: str) -> float:
        """Seconds a query to ``node_id`` may take: a proven peer gets the request timeout,
        anyone else VERIFY_TIMEOUT."""
        return self.config.rpc_timeout if self.proven(node_id) else VERIFY_TIMEOUT

    async def _open_hedged(
        self, digest: Digest, offset: int, queue: list[Contact]
    ) -> tuple[Contact, PeerBlob] | None:
        """Open ``digest`` at ``offset`` from the first of ``queue`` to answer.

        Providers are asked in order; the next one is asked too when the current ones
        have not answered within HEDGE_DELAY s (or failed). The first answer wins, the
        other requests are cancelled (or their answers closed). Asked providers leave
        ``queue``; ``None`` when none answered.
        """
        winner: list[tuple[Contact, PeerBlob]] = []

        async def attempt(c: Contact, finished: anyio.Event) -> None:
            nid = c.node_id.hex()
            st = self._stats_for(nid, c.address)
            try:
                client = await self._client(c.address)
                seconds = self._open_timeout(c)
                try:
                    with anyio.fail_after(seconds + 1):  # even if the transport does not
                        blob = await client.open_blob(digest, offset=offset, timeout=seconds)
                except TimeoutError:
                    raise TransportError(f"{c.address} did not answer within {seconds:g} s"
                                         ) from None
            except (TransportError, PeerMisbehaved, OSError) as exc:
                st.failures += 1
                if isinstance(exc, PeerMisbehaved):
                    self._blame(nid, exc.reason)
                log.warning("Peer %s did not serve %s from byte %d (%s); trying the next "
                            "provider", nid[:16], digest, offset, exc)
                finished.set()
                return
            except BaseException:  # cancelled: another answered first; asked again on resume
                queue.append(c)
                finished.set()
                raise
            if winner:
                await _close_body(blob.body)
            else:
                winner.append((c, blob))
                tg.cancel_scope.cancel()
            finished.set()

        async with anyio.create_task_group() as tg:
            while queue and not winner:
                finished = anyio.Event()
                tg.start_soon(attempt, queue.pop(0), finished)
                with anyio.move_on_after(HEDGE_DELAY):
                    await finished.wait()
        return winner[0] if winner else None

    async def _chain(
        self, digest: Digest, providers: list[Contact], served_by: list[str]
    ) -> AsyncIterator[bytes]:
        """The blob's bytes from ``providers`` in turn, resuming where the last one stopped.

        Each provider is opened hedged (:meth:`_open_hedged`): a provider that does not
        answer costs at most HEDGE_DELAY s before the next is asked too."""
        received = 0
        size: int | None = None
        queue = list(providers)
        while queue:
            opened = await self._open_hedged(digest, received, queue)
            if opened is None:
                break
            c, blob = opened
            nid = c.node_id.hex()
            st = self._stats_for(nid, c.address)
            st.inflight += 1
            started, got = time.monotonic(), 0
            try:
                if blob.size is not None:
                    if size is None:
                        size = blob.size
                        await self.node.make_room(blob.size)
                        receiving = self.node.receiving.get(digest.hex)
                        if receiving is not None:
                            receiving.source = f"pulled from peer {nid}"
                            receiving.set_size(size)  # clients get their headers now
                    elif blob.size != size:
                        self._blame(nid, f"announced {blob.size} bytes for {digest}, not {size}")
                        await _close_body(blob.body)
                        continue
                served_by.append(nid)
                receiving = self.node.receiving.get(digest.hex)
                if receiving is not None:
                    receiving.source = "pulled from peer " + ", ".join(dict.fromkeys(served_by))
                async for chunk in blob.body:
                    received += len(chunk)
                    got += len(chunk)
                    if size is not None and received > size:
                        raise PeerMisbehaved(nid, f"sent more than {size} bytes")
                    yield chunk
                if size is None or received >= size:
                    st.served += 1
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
                st.bytes_in += got
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
                for address in self.config.peers:  # configured peers are met again if lost
                    if not any(s.proven and address in split_address(s.address)
                               for s in self.stats.values()):
                        try:
                            await self.rpc(address, "PING", {}, {"PONG"},
                                           timeout=min(HEAD_TIMEOUT, self.config.rpc_timeout))
                        except (PyrsiaError, ValueError):
                            pass
                try:
                    await self.sync()
                except (PyrsiaError, ValueError) as exc:
                    log.warning("Ledger sync failed: %s", exc)
                self.replay.expire(self.now())
                self.expire_peers()
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


async def _close_body(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            try:
                await aclose()
            except Exception as exc:  # closing a peer's stream: nothing more to do
                log.debug("Closing a peer's blob stream failed: %s", exc)


def _authority(address: str) -> str:
    """The hosts and ports of a (multi-) address, without paths: what gets contacted."""
    return ",".join(urlsplit(url).netloc or url for url in split_address(address))


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
