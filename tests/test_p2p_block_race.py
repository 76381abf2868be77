"""A block that arrives from an honest peer while this node's own consensus commits the same
height is no misbehaviour of that peer (in process, deterministic).

On a build node, consensus appends its decided block without the peer service's sync lock;
the same block gossiped (``NEW_BLOCK``) or synced (``GET_BLOCKS``) by a faster build node can
pass the height check first and then find the height taken. Seen with four real build nodes:
``Peer ... misbehaved: gossiped an invalid block: block rejected (height): expected height 9,
got 8``, after which the honest peer ranked last as a provider. The tests hold the node's
commit lock while the block arrives, append it "by consensus", and release the lock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import attrs
import pytest
from pyrsia_core.errors import PeerMisbehaved
from pyrsia_core.testing import MemoryNetwork
from pyrsia_registry._p2p import PeerService
from support.memnodes import attach, memory_node

from pyrsia_core import CommittedBlock, Digest, Record
from pyrsia_registry import Node

pytestmark = pytest.mark.anyio


@attrs.define
class Pair:
    build: Node
    follower: Node
    peers: PeerService
    block: CommittedBlock


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    memory = MemoryNetwork(seed=1)
    build = await memory_node(tmp_path, "build", None)
    digest = Digest.of(b"layer")
    await build.commit([Record.new(
        signer=build.signer, package_type="Docker", package_specific_id="app:1",
        package_specific_artifact_id=f"app@{digest}", artifact_hash=digest.hex, num_artifacts=1,
        timestamp=int(build.clock.now()))])
    genesis = await build.log_store.block(0)
    block = await build.log_store.block(1)
    assert genesis is not None and block is not None
    follower = await memory_node(tmp_path, "follower", genesis)
    attach(memory, build, "memory://build")
    peers = attach(memory, follower, "memory://follower")
    await peers.ping("memory://build")
    assert follower.log_store.ledger.height == 0
    try:
        yield Pair(build, follower, peers, block)
    finally:
        await follower.aclose()
        await build.aclose()


async def _while_consensus_commits(pair: Pair, arrive: Callable[[], Awaitable[None]]) -> None:
    """``arrive()`` runs into the commit lock; meanwhile "consensus" appends the block."""
    lock = pair.follower._commit_lock
    async with anyio.create_task_group() as tg:
        await lock.acquire()
        try:
            tg.start_soon(arrive)
            await anyio.wait_all_tasks_blocked()
            await pair.follower.log_store.append(pair.block, now=pair.follower.clock.now())
        finally:
            lock.release()
    assert pair.follower.log_store.ledger.height == 1


async def test_a_gossiped_block_committed_here_meanwhile_is_not_blamed(pair: Pair) -> None:
    env = await pair.peers.ping("memory://build")  # any envelope the build node signed
    blamed: list[PeerMisbehaved] = []

    async def gossiped() -> None:
        try:
            await pair.peers._receive_block(pair.block, env)
        except PeerMisbehaved as exc:
            blamed.append(exc)

    await _while_consensus_commits(pair, gossiped)
    assert blamed == []


async def test_a_synced_block_committed_here_meanwhile_is_not_blamed(pair: Pair) -> None:
    await _while_consensus_commits(pair, pair.peers.sync)
    assert pair.peers.stats[pair.build.node_id].misbehaved == 0
    assert not pair.follower.activity.failures
