"""Peers that send wrong bytes, truncate, break or vanish mid-transfer (in process).

Real nodes (ledger, stores, PeerService) on pyrsia_core's in-memory network, whose
fault injection makes the misbehaviour deterministic. The bad bytes never reach the
store, the fetch resumes from the next provider, and the culprit is reported.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
from pyrsia_core.testing import MemoryNetwork
from pyrsia_registry._p2p import PeerService, PeerStats
from support.memnodes import attach, memory_node

from pyrsia_core import Digest, Record
from pyrsia_registry import Node

pytestmark = pytest.mark.anyio
BLOB = random.Random(7).randbytes(1_000_003)
DIGEST = Digest.of(BLOB)


@attrs.define
class Net:
    memory: MemoryNetwork
    build: Node
    evil: Node
    honest: Node
    victim: Node


def _attach(net: MemoryNetwork, node: Node, address: str) -> PeerService:
    return attach(net, node, address, blob_timeout=5)


_node = memory_node


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    memory = MemoryNetwork(seed=1)
    build = await _node(tmp_path, "build", None)
    await build.blobs.put_bytes(BLOB, expected=DIGEST)
    await build.commit([Record.new(
        signer=build.signer, package_type="Docker", package_specific_id="big:1",
        package_specific_artifact_id=f"big@{DIGEST}", artifact_hash=DIGEST.hex, num_artifacts=1,
        timestamp=int(build.clock.now()))])
    genesis = await build.log_store.block(0)
    nodes = [build] + [await _node(tmp_path, n, genesis) for n in ("evil", "honest", "victim")]
    for node, name in zip(nodes, ("build", "evil", "honest", "victim"), strict=True):
        _attach(memory, node, f"memory://{name}")
    build_url = "memory://build"
    for node in nodes[1:]:
        await node.peers.ping(build_url)
        await node.peers.sync()
        assert node.log_store.ledger.height == 1
    for node in nodes[1:3]:  # evil and honest hold the blob, fetched from the build node
        await node.peers.fetch(DIGEST)
        assert await node.local_blob(DIGEST) is not None
    memory.faults(build_url).down = True  # from now on only evil and honest can serve
    await nodes[3].peers.ping("memory://evil")
    await nodes[3].peers.ping("memory://honest")
    try:
        yield Net(memory, *nodes)
    finally:
        for node in nodes:
            await node.aclose()


def _prefer_evil(net: Net) -> None:
    """Make the victim rank the evil peer first (it looks fastest)."""
    stats = net.victim.peers.stats
    stats[net.evil.node_id] = PeerStats("memory://evil", throughput=1e12)
    stats[net.honest.node_id] = PeerStats("memory://honest", throughput=1e3)


async def _assert_fetched(net: Net) -> None:
    info = await net.victim.peers.fetch(DIGEST)
    assert info.size == len(BLOB)
    assert await net.victim.blobs.read_bytes(DIGEST) == BLOB


@pytest.mark.parametrize(
    ("fault", "value"),
    [("truncate_after", 300_000), ("fail_after", 600_000), ("down", True)],
)
async def test_resume_from_next_provider(net: Net, fault: str, value: object,
                                         caplog: pytest.LogCaptureFixture) -> None:
    _prefer_evil(net)
    setattr(net.memory.faults("memory://evil"), fault, value)
    caplog.set_level(logging.WARNING, logger="pyrsia.p2p")
    await _assert_fetched(net)
    if fault != "down":  # a peer that is down is simply not among the providers found
        assert net.evil.node_id[:16] in caplog.text
        assert "resuming from the next provider" in caplog.text
        assert net.victim.peers.stats[net.evil.node_id].failures >= 1


async def test_wrong_bytes_never_stored_and_liar_reported(
    net: Net, caplog: pytest.LogCaptureFixture
) -> None:
    _prefer_evil(net)
    net.memory.faults("memory://evil").corrupt_at = 123_456
    caplog.set_level(logging.WARNING)
    await _assert_fetched(net)
    assert net.victim.peers.stats[net.evil.node_id].misbehaved >= 1
    assert f"Peer {net.evil.node_id[:16]} misbehaved" in caplog.text
    assert net.victim.peers.stats[net.honest.node_id].misbehaved == 0
    # Next time the liar is ranked last.
    ranked = net.victim.peers._rank(
        await net.victim.peers.find_providers(DIGEST), DIGEST.raw)
    assert ranked[-1].node_id.hex() == net.evil.node_id


async def test_every_provider_bad_stores_nothing(net: Net) -> None:
    _prefer_evil(net)
    net.memory.faults("memory://evil").corrupt_at = 10
    net.memory.faults("memory://honest").truncate_after = 10
    from pyrsia_core.errors import PyrsiaError

    with pytest.raises(PyrsiaError):
        await net.victim.peers.fetch(DIGEST)
    assert await net.victim.local_blob(DIGEST) is None
    assert [d async for d in net.victim.blobs.iter_digests()] == []


async def test_no_serve_and_rate_limit_politeness(net: Net) -> None:
    net.honest.peers.config.no_serve = True
    assert await net.honest.peers.blob_source(DIGEST, 0) is None
    net.honest.peers.config.no_serve = False
    assert await net.honest.peers.blob_source(DIGEST, 0) is not None
