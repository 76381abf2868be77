"""Hostile peers with keys of their own (anyone can make one) against real nodes, in process.

Real nodes (ledger, stores, PeerService) on pyrsia_core's in-memory network; the attacker
is a set of fresh Ed25519 keys sending signed frames to ``PeerService.handle`` and, where
it needs an address, a handler of its own on the network (a tarpit that never answers a
blob request, or a liar answering FIND_NODE with made-up contacts). Every attack is
bounded in count, and every test in time (``anyio.fail_after``).
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import attrs
import pytest
from pyrsia_core._wire import open_frame, seal
from pyrsia_core.errors import PyrsiaError
from pyrsia_core.interfaces import PeerBlob, RequestHandler
from pyrsia_core.testing import MemoryNetwork
from pyrsia_registry._p2p import (
    ADDRESS_CHECKS,
    MAX_IDS_PER_HOST,
    MAX_PROVIDER_RECORDS,
    MAX_RECORDS_PER_PROVIDER,
    PEER_EXPIRY,
    PEER_FAILURES,
    PeerService,
)
from support.memnodes import attach, memory_node

from pyrsia_core import (
    CommittedBlock,
    Digest,
    Ed25519Signer,
    Ledger,
    Record,
    SignedRecord,
    block_checkpoint,
    sign_checkpoint,
)
from pyrsia_registry import Node

pytestmark = pytest.mark.anyio
BLOB = random.Random(5).randbytes(200_003)
DIGEST = Digest.of(BLOB)
_SEED = iter(range(1, 1 << 30))


def key() -> Ed25519Signer:
    return Ed25519Signer.from_seed(next(_SEED).to_bytes(32, "big"))


@attrs.define
class Net:
    memory: MemoryNetwork
    build: Node
    victim: Node


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    memory = MemoryNetwork(seed=1)
    build = await memory_node(tmp_path, "build", None)
    await build.blobs.put_bytes(BLOB, expected=DIGEST)
    await build.commit([Record.new(
        signer=build.signer, package_type="Docker", package_specific_id="img:1",
        package_specific_artifact_id=f"img@{DIGEST}", artifact_hash=DIGEST.hex, num_artifacts=1,
        timestamp=int(build.clock.now()))])
    genesis = await build.log_store.block(0)
    victim = await memory_node(tmp_path, "victim", genesis)
    attach(memory, build, "memory://build", sync_interval=0.2)
    attach(memory, victim, "memory://victim", sync_interval=0.2)
    await victim.peers.ping("memory://build")
    await victim.peers.sync()
    assert victim.log_store.ledger.height == 1
    try:
        yield Net(memory, build, victim)
    finally:
        for node in (build, victim):
            await node.aclose()


@asynccontextmanager
async def running(*services: PeerService) -> AsyncIterator[None]:
    """The services' background loops (verification, sync, republish) run meanwhile."""
    async with anyio.create_task_group() as tg:
        for service in services:
            service.config.listen_only = True
            await tg.start(service.run)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


async def send(service: PeerService, signer: Ed25519Signer, type_: str, body: dict[str, object],
               address: str) -> str:
    reply = await service.handle(seal(signer, type_, body, address=address, now=time.time()))
    return open_frame(reply, now=time.time()).type


def tarpit(memory: MemoryNetwork, address: str, *, answer: bool = False) -> list[str]:
    """Serve ``address``: requests get garbage (or, with ``answer``, nothing for an hour),
    blob fetches never an answer. Returns the log of what was asked."""
    asked: list[str] = []

    async def handler(frame: bytes) -> bytes:
        asked.append("rpc")
        if answer:
            await anyio.sleep(3600)
        return b"not a frame"

    async def blobs(digest: Digest, offset: int) -> PeerBlob | None:
        asked.append("blob")
        await anyio.sleep(3600)
        return None

    memory.serve(address, handler, blobs)
    return asked


# ------------------------------------------------------------------------- fault 1


async def test_fake_provider_records_do_not_stall_a_pull(net: Net) -> None:
    """Twenty fresh keys announce the digest at a tarpit; the pull still takes seconds.

    Before: records never measured were tried first, each with the full blob timeout."""
    net.victim.peers.config.blob_timeout = 15
    asked = tarpit(net.memory, "memory://tarpit")
    async with running(net.victim.peers):
        for _ in range(20):
            assert await send(net.victim.peers, key(), "ADD_PROVIDER", {"keys": [DIGEST.hex]},
                              "memory://tarpit") == "OK"
        assert len(net.victim.peers.providers.get(DIGEST.raw, 0)) >= 1  # records are kept
        started = time.monotonic()
        with anyio.fail_after(10):
            info = await net.victim.peers.fetch(DIGEST)
        elapsed = time.monotonic() - started
    assert info.size == len(BLOB)
    assert await net.victim.blobs.read_bytes(DIGEST) == BLOB
    assert elapsed < 3, elapsed
    # The fakes never proved they are anyone: none is a peer, none was polled as one.
    assert not any(net.victim.peers.proven(nid) for nid in net.victim.peers.stats
                   if nid != net.build.node_id)
    assert [p["node_id"] for p in net.victim.peers.peers()] == [net.build.node_id]
    assert asked.count("rpc") <= ADDRESS_CHECKS


async def test_only_tarpits_cost_bounded_time(net: Net) -> None:
    """When no honest provider is known, the fakes cost at most a few seconds in all."""
    net.memory.faults("memory://build").down = True
    tarpit(net.memory, "memory://tarpit")
    for _ in range(20):
        await send(net.victim.peers, key(), "ADD_PROVIDER", {"keys": [DIGEST.hex]},
                   "memory://tarpit")
    started = time.monotonic()
    with anyio.fail_after(20), pytest.raises(PyrsiaError, match=r"failed|no peer"):
        await net.victim.peers.fetch(DIGEST)
    assert time.monotonic() - started < 10


# ------------------------------------------------------------------------- fault 4


def far_ahead_block(genesis: CommittedBlock, signer: Ed25519Signer, height: int,
                    parent: str) -> dict[str, object]:
    """A block far ahead, certified by ``signer`` (not a build node of the network)."""
    ledger = Ledger.start(genesis)
    record = SignedRecord.sign(Record.new(
        signer=signer, package_type="Docker", package_specific_id="evil:1",
        package_specific_artifact_id="evil:1", artifact_hash="ab" * 32, num_artifacts=1,
        timestamp=int(time.time())), signer)
    block = ledger.propose(proposer=signer, records=[record], timestamp=int(time.time()))
    block = attrs.evolve(block, height=height, parent=parent)
    cert = sign_checkpoint(block_checkpoint(ledger.origin, block),
                           [(f"{ledger.origin}/{signer.node_id}", signer)])
    return CommittedBlock(block, cert).to_json()


async def test_far_ahead_blocks_do_not_stall_sync(net: Net) -> None:
    """Twelve far-ahead NEW_BLOCKs naming a tarpit: the next real block still lands at once.

    Before: each one made the node sync from the sender's claimed address, holding the
    sync lock for the whole request timeout."""
    tarpit(net.memory, "memory://tarpit", answer=True)
    genesis = await net.build.log_store.block(0)
    assert genesis is not None
    async with running(net.victim.peers):
        for i in range(12):
            body = {"block": far_ahead_block(genesis, key(), 1000 + i,
                                             net.victim.log_store.ledger.head_hash)}
            await send(net.victim.peers, key(), "NEW_BLOCK", body, "memory://tarpit")
        await net.build.commit([Record.new(
            signer=net.build.signer, package_type="Docker", package_specific_id="img:2",
            package_specific_artifact_id="img@x", artifact_hash="cd" * 32, num_artifacts=1,
            timestamp=int(net.build.clock.now()))])
        committed = await net.build.log_store.block(2)
        assert committed is not None
        started = time.monotonic()
        with anyio.fail_after(10):
            assert await send(net.victim.peers, net.build.signer, "NEW_BLOCK",
                              {"block": committed.to_json()}, "memory://build") == "OK"
        assert time.monotonic() - started < 2
        assert net.victim.log_store.ledger.height == 2


async def test_a_peer_claiming_a_height_it_does_not_serve_costs_one_bounded_attempt(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proven peer that claims a huge height and never sends blocks: the honest peer's
    blocks still arrive within the sync round."""
    import pyrsia_registry._p2p as p2p

    monkeypatch.setattr(p2p, "SYNC_ATTEMPT_TIMEOUT", 1.0)
    liar = key()

    async def handler(frame: bytes) -> bytes:
        env = open_frame(frame, now=time.time())
        if env.type == "GET_BLOCKS":
            await anyio.sleep(3600)
        body = {"height": 10**6, "hash": "00" * 32, "uploads": 0,
                "genesis": net.victim.log_store.ledger.genesis_hash}
        return seal(liar, "HEAD" if env.type == "GET_HEAD" else "PONG", body,
                    address="memory://liar", now=time.time())

    net.memory.serve("memory://liar", handler)
    await net.victim.peers.ping("memory://liar")
    assert net.victim.peers.proven(liar.node_id)
    await net.build.commit([Record.new(
        signer=net.build.signer, package_type="Docker", package_specific_id="img:3",
        package_specific_artifact_id="img@y", artifact_hash="ef" * 32, num_artifacts=1,
        timestamp=int(net.build.clock.now()))])
    with anyio.fail_after(8):
        await net.victim.peers.sync()
    assert net.victim.log_store.ledger.height == 2


# ------------------------------------------------------------------------- fault 5, 11, 15


async def test_claimed_addresses_are_checked_once_and_never_polled(net: Net) -> None:
    """500 PINGs from fresh keys naming one address: it is contacted a few times at most,
    none becomes a peer, nothing is polled afterwards. Before: all 500 were stored and
    polled every sync interval."""
    asked = tarpit(net.memory, "memory://target")
    async with running(net.victim.peers):
        with anyio.fail_after(30):
            for i in range(500):
                await send(net.victim.peers, key(), "PING", {}, f"memory://target{'/x' * (i % 3)}")
            await anyio.sleep(1.5)  # several sync intervals
    assert asked.count("rpc") <= ADDRESS_CHECKS
    assert {p["node_id"] for p in net.victim.peers.peers()} == {net.build.node_id}
    assert sum(st.proven for st in net.victim.peers.stats.values()) == 1
    assert len(net.victim.peers.stats) <= 1 + 1024


async def test_a_node_answering_as_itself_is_proven(net: Net) -> None:
    """A signed request makes the node contact the sender's address; only a reply signed by
    the same key makes it a peer. A key that only asked for the genesis is not recorded."""
    newcomer = await memory_node(net.victim.config.data_dir.parent, "newcomer",
                                 await net.build.log_store.block(0))
    try:
        attach(net.memory, newcomer, "memory://newcomer")
        impostor = key()
        # The impostor claims the newcomer's address: the newcomer answers as itself.
        await send(net.build.peers, impostor, "PING", {}, "memory://newcomer")
        assert not net.build.peers.proven(impostor.node_id)
        assert net.build.peers.proven(newcomer.node_id)  # it answered the check
        # Asking for the genesis records nobody.
        joiner = key()
        assert await send(net.build.peers, joiner, "GET_GENESIS", {}, "memory://nobody") == \
            "GENESIS"
        assert joiner.node_id not in net.build.peers.stats
        ids = {p["node_id"] for p in net.build.peers.peers()}
        assert ids == {net.victim.node_id, newcomer.node_id}
        assert net.build.peers.stats[newcomer.node_id].public_key == \
            newcomer.signer.public_key.hex
    finally:
        await newcomer.aclose()


async def test_one_host_proves_at_most_two_ids(net: Net) -> None:
    """An attacker's server answers as 30 ids (one path each): keys are free, hosts are not,
    so at most MAX_IDS_PER_HOST of them are kept as peers and polled."""
    liars = [key() for _ in range(30)]

    def answer_as(signer: Ed25519Signer, address: str) -> RequestHandler:
        async def handler(frame: bytes) -> bytes:
            env = open_frame(frame, now=time.time())
            body = {"height": 1, "hash": "", "uploads": 0,
                    "genesis": net.victim.log_store.ledger.genesis_hash}
            return seal(signer, "HEAD" if env.type == "GET_HEAD" else "PONG", body,
                        address=address, now=time.time())
        return handler

    for i, liar in enumerate(liars):
        address = f"memory://liar/k{i}"
        net.memory.serve(address, answer_as(liar, address))
        await net.victim.peers.ping(address)
    kept = [liar for liar in liars if net.victim.peers.proven(liar.node_id)]
    assert len(kept) <= MAX_IDS_PER_HOST
    assert {p["node_id"] for p in net.victim.peers.peers()} <= {
        net.build.node_id, *(liar.node_id for liar in kept)}
    assert net.victim.peers.proven(net.build.node_id)


async def test_fake_contacts_from_nodes_replies_never_enter_the_table(net: Net) -> None:
    """A peer answers FIND_NODE with 20 made-up contacts (at its own address, where it
    answers anything with its own key): none is taken into the table or handed on."""
    liar = key()
    fakes = [key().node_id for _ in range(20)]

    async def handler(frame: bytes) -> bytes:
        env = open_frame(frame, now=time.time())
        body: dict[str, object] = {"height": 0, "hash": "", "genesis": "", "uploads": 0}
        type_ = "PONG"
        if env.type in ("FIND_NODE", "GET_PROVIDERS"):
            type_ = "NODES" if env.type == "FIND_NODE" else "PROVIDERS"
            body = {"contacts": [{"node_id": f, "address": "memory://liar"} for f in fakes],
                    "providers": []}
        return seal(liar, type_, body, address="memory://liar", now=time.time())

    net.memory.serve("memory://liar", handler)
    await net.victim.peers.ping("memory://liar")
    with anyio.fail_after(20):
        await net.victim.peers.bootstrap()
        await net.victim.peers.lookup(bytes(32))
    known = {c.node_id.hex() for c in net.victim.peers.table.contacts()}
    assert known == {net.build.node_id, liar.node_id}
    assert not set(fakes) & set(net.victim.peers.stats)
    reply = await net.victim.peers.handle(seal(key(), "FIND_NODE", {"target": "00" * 32},
                                               address="memory://x", now=time.time()))
    handed = {c["node_id"] for c in open_frame(reply, now=time.time()).body["contacts"]}
    assert not handed & set(fakes)


async def test_peers_that_stop_answering_are_dropped(net: Net) -> None:
    assert net.victim.peers.proven(net.build.node_id)
    net.memory.faults("memory://build").down = True
    for _ in range(PEER_FAILURES):
        await net.victim.peers.sync()
    assert net.victim.peers.peers() == []
    assert len(net.victim.peers.table) == 0
    assert not net.victim.peers.proven(net.build.node_id)
    # It comes back: one answer and it is a peer again.
    net.memory.faults("memory://build").down = False
    await net.victim.peers.ping("memory://build")
    peers = net.victim.peers.peers()
    assert [p["node_id"] for p in peers] == [net.build.node_id]
    assert abs(peers[0]["last_seen"] - time.time()) < 5 and peers[0]["last_seen_ago"] < 5
    # Not heard from for too long (say, never polled): dropped as well.
    net.victim.peers.stats[net.build.node_id].last_seen -= PEER_EXPIRY + 1
    assert net.victim.peers.expire_peers() == 1
    assert net.victim.peers.peers() == []


# ------------------------------------------------------------------------- fault 6


async def test_provider_records_are_bounded(net: Net) -> None:
    """500 ADD_PROVIDERs of 256 keys from 10 keys (128,000 records): the table keeps at
    most its global cap, and each announcer at most its own."""
    announcers = [key() for _ in range(10)]
    rng = random.Random(3)
    with anyio.fail_after(60):
        for i in range(500):
            keys = [rng.randbytes(32).hex() for _ in range(256)]
            assert await send(net.victim.peers, announcers[i % 10], "ADD_PROVIDER",
                              {"keys": keys}, "memory://nowhere") == "OK"
    store = net.victim.peers.providers
    assert len(store) <= MAX_PROVIDER_RECORDS
    assert all(store.records_of(bytes.fromhex(a.node_id)) <= MAX_RECORDS_PER_PROVIDER
               for a in announcers)
    # An honest node announcing little still gets its record in.
    honest = key()
    assert await send(net.victim.peers, honest, "ADD_PROVIDER", {"keys": [DIGEST.hex]},
                      "memory://honest") == "OK"
    assert bytes.fromhex(honest.node_id) in {
        c.node_id for c in store.get(DIGEST.raw, net.victim.clock.monotonic())}

