"""Swarm fetch of a large blob in verified parts (in process, on the memory network).

A build node logs the blob with its part list; several nodes fetch it at once while
the build node's upload is rate-limited, so they must serve each other the parts
they already hold. Every part is checked against the logged list before it is
written or served on; a node that lies about a part is reported and avoided.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import attrs
import pytest
from pyrsia_core.errors import PyrsiaError
from pyrsia_core.testing import MemoryNetwork
from pyrsia_registry._p2p import PeerService
from pyrsia_registry._swarm import PartialBlob, parse_bitmap
from support.memnodes import attach, memory_node

from pyrsia_core import (
    PARTS_RECORD_TYPE,
    CommittedBlock,
    Digest,
    PartList,
    Record,
    SignedRecord,
)
from pyrsia_registry import Node, NodeConfig

pytestmark = pytest.mark.anyio
MiB = 1 << 20
BLOB = random.Random(11).randbytes(6 * MiB + 12_345)  # 7 parts of 1 MiB
DIGEST = Digest.of(BLOB)


@attrs.define
class Swarm:
    memory: MemoryNetwork
    seeder: Node
    fetchers: list[Node]


async def _node(tmp: Path, name: str, genesis: CommittedBlock | None) -> Node:
    node = await memory_node(tmp, name, genesis)
    node.part_threshold = 4 * MiB
    return node


def _attach(net: MemoryNetwork, node: Node, address: str, rate: float | None) -> PeerService:
    return attach(net, node, address, blob_timeout=2, max_upload_rate=rate)


@pytest.fixture
async def swarm(tmp_path: Path) -> AsyncIterator[Swarm]:
    memory = MemoryNetwork(seed=3)
    seeder = await _node(tmp_path, "seeder", None)
    await seeder.blobs.put_bytes(BLOB, expected=DIGEST)
    now = int(seeder.clock.now())
    records = [Record.new(
        signer=seeder.signer, package_type="Docker", package_specific_id="big:1",
        package_specific_artifact_id=f"big@{DIGEST}", artifact_hash=DIGEST.hex, num_artifacts=1,
        timestamp=now)]
    records += await seeder.part_list_records([DIGEST], now)
    assert [r.package_type for r in records] == ["Docker", PARTS_RECORD_TYPE]
    await seeder.commit(records)
    genesis = await seeder.log_store.block(0)
    fetchers = [await _node(tmp_path, f"f{i}", genesis) for i in range(4)]
    # The seeder uploads slowly: fetching everything from it alone would take long.
    _attach(memory, seeder, "memory://seeder", rate=2 * MiB)
    for i, node in enumerate(fetchers):
        _attach(memory, node, f"memory://f{i}", rate=None)
    for node in fetchers:
        await node.peers.ping("memory://seeder")
        for other in range(len(fetchers)):
            if node is not fetchers[other]:
                await node.peers.ping(f"memory://f{other}")
        await node.peers.sync()
        assert node.log_store.ledger.height == 1
    try:
        yield Swarm(memory, seeder, fetchers)
    finally:
        for node in [seeder, *fetchers]:
            await node.aclose()


async def _fetch_all(nodes: list[Node]) -> None:
    async with anyio.create_task_group() as tg:
        for node in nodes:
            tg.start_soon(node.peers.fetch, DIGEST)


async def test_fetchers_share_verified_parts(
    swarm: Swarm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyrsia.p2p")
    with anyio.fail_after(60):
        await _fetch_all(swarm.fetchers)
    for node in swarm.fetchers:
        assert await node.blobs.read_bytes(DIGEST) == BLOB
        assert not node.peers.partials  # the partial file is gone once the blob is stored
    lines = [line for line in caplog.messages if "verified parts" in line]
    assert len(lines) == 4
    # Parts came from fetchers too, not only from the seeder.
    fetcher_ids = {n.node_id[:16] for n in swarm.fetchers}
    assert any(nid in line for line in lines for nid in fetcher_ids), lines
    # The seeder served fewer parts than 4 whole copies.
    seeder_parts = sum(
        int(line.split(f"{swarm.seeder.node_id[:16]}: ")[1].split(",")[0].split(")")[0])
        for line in lines if swarm.seeder.node_id[:16] in line
    )
    assert seeder_parts < 4 * 7


async def test_a_node_that_lies_about_a_part_is_reported(
    swarm: Swarm, caplog: pytest.LogCaptureFixture
) -> None:
    liar, victim, honest = swarm.fetchers[0], swarm.fetchers[1], swarm.fetchers[2]
    with anyio.fail_after(60):
        await liar.peers.fetch(DIGEST)
        await honest.peers.fetch(DIGEST)
    faults = swarm.memory.faults
    faults("memory://f0").corrupt_at = 2 * MiB + 5  # the liar flips a byte of part 2
    faults("memory://seeder").down = True
    faults("memory://f2").down = True
    caplog.set_level(logging.WARNING)
    # Only the liar is up: part 2 never verifies, so nothing is stored.
    with anyio.fail_after(60), pytest.raises(PyrsiaError, match="no peer sent a good part"):
        await victim.peers.fetch(DIGEST)
    assert await victim.local_blob(DIGEST) is None
    assert victim.peers.stats[liar.node_id].misbehaved >= 1
    assert "wrong part 2" in caplog.text
    # With an honest holder back, the fetch completes with the right bytes.
    faults("memory://f2").down = False
    with anyio.fail_after(60):
        await victim.peers.fetch(DIGEST)
    assert await victim.blobs.read_bytes(DIGEST) == BLOB


async def test_parts_are_served_only_once_verified(tmp_path: Path) -> None:
    parts = PartList.of_chunks(DIGEST, [BLOB])
    partial = PartialBlob(parts, tmp_path / "p" / DIGEST.hex)
    try:
        assert partial.bitmap() == "0" and partial.run_from(0) == 0
        offset, length = parts.span(2)
        partial.write(2, BLOB[offset : offset + length])
        assert partial.run_from(0) == 0 and partial.run_from(offset) == MiB
        assert partial.run_from(offset + 1) == 0  # only from a part boundary
        partial.write(3, BLOB[3 * MiB : 4 * MiB])
        assert partial.run_from(offset) == 2 * MiB
        assert parse_bitmap(partial.bitmap(), len(parts)) == bytearray([0, 0, 1, 1, 0, 0, 0])
        got = b"".join([c async for c in partial.read(offset, 2 * MiB)])
        assert got == BLOB[2 * MiB : 4 * MiB]
        assert parse_bitmap("all", 3) == bytearray([1, 1, 1])
        for bad in ("xyz", 7, "f" * 100):
            assert parse_bitmap(bad, 7) is None
    finally:
        partial.close()
    assert not (tmp_path / "p" / DIGEST.hex).exists()


async def test_validators_recompute_part_lists(swarm: Swarm) -> None:
    block = (await swarm.seeder.log_store.block(1))
    assert block is not None
    assert await swarm.seeder.check_part_lists(block.block)
    # A part list record claiming another hash is refused by a node holding the blob.
    bad = Record.new(
        signer=swarm.seeder.signer, package_type=PARTS_RECORD_TYPE,
        package_specific_id=str(DIGEST), package_specific_artifact_id=f"{DIGEST}#parts",
        artifact_hash="ab" * 32, num_artifacts=1, timestamp=int(swarm.seeder.clock.now()))
    proposal = swarm.seeder.log_store.ledger.propose(
        proposer=swarm.seeder.signer,
        records=[SignedRecord.sign(bad, swarm.seeder.signer)],
        timestamp=int(swarm.seeder.clock.now()))
    assert not await swarm.seeder.check_part_lists(proposal)
    # A node without the blob cannot vouch for its part list.
    assert not await swarm.fetchers[0].check_part_lists(block.block)


# --------------------------------------------------------------------------- real processes


async def _seed_blob(data_dir: Path, blob: bytes, digest: Digest) -> None:
    node = await Node.open(NodeConfig(data_dir=data_dir, upstream=None))
    try:
        await node.blobs.put_bytes(blob, expected=digest)
        now = int(node.clock.now())
        records = [Record.new(
            signer=node.signer, package_type="Docker", package_specific_id="big:1.0",
            package_specific_artifact_id=f"library/big@{digest}", artifact_hash=digest.hex,
            num_artifacts=1, timestamp=now)]
        records += await node.part_list_records([digest], now)  # 24 MiB >= the 8 MiB default
        assert len(records) == 2
        await node.commit(records)
    finally:
        await node.aclose()


def test_swarm_between_node_processes(tmp_path: Path) -> None:
    """A seeder and three fetchers as `pyrsia node start` processes; every upload capped.

    The three pull the blob through their OCI APIs at once; each gets the right bytes,
    and the fetchers' logs show parts served by other fetchers, not only the seeder.
    """
    import hashlib
    import subprocess
    import time

    import httpx
    from support.node import NodeProcess

    blob = random.Random(5).randbytes(24 * MiB + 777)
    digest = Digest.of(blob)
    seeder_dir = tmp_path / "seed"
    anyio.run(_seed_blob, seeder_dir / "data", blob, digest)
    fast = ("--sync-interval", "0.5", "--max-upload-rate", "6MB/s")
    with NodeProcess(seeder_dir, upstream=None, extra=fast) as seeder:
        fetchers = [NodeProcess(tmp_path / f"f{i}", upstream=None,
                                extra=(*fast, "--peer", seeder.url)) for i in range(3)]
        try:
            for f in fetchers:
                f.start()
            deadline = time.monotonic() + 60
            while any(httpx.get(f"{f.url}/api/status", timeout=10).json()["ledger_height"] < 1
                      for f in fetchers):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            outs = [tmp_path / f"out{i}" for i in range(3)]
            procs = [subprocess.Popen(["curl", "-sf", "--max-time", "120", "-o", str(out),
                                       f"{f.url}/v2/library/big/blobs/{digest}"])
                     for f, out in zip(fetchers, outs, strict=True)]
            assert [p.wait() for p in procs] == [0, 0, 0]
            for out in outs:
                assert hashlib.sha256(out.read_bytes()).hexdigest() == digest.hex
            seeder_id = httpx.get(f"{seeder.url}/api/status", timeout=10).json()["node_id"]
            served = ""
            for f in fetchers:
                log = f.log()
                assert "verified parts" in log, log[-3000:]
                served += log.split("verified parts (")[1].split(")")[0] + ", "
            others = [item for item in served.split(", ")
                      if item and not item.startswith(seeder_id[:16])]
            assert others, f"every part came from the seeder: {served}"
        finally:
            for f in fetchers:
                f.stop()


async def test_fake_providers_do_not_stall_a_swarm_fetch(swarm: Swarm) -> None:
    """Twenty fresh keys announce the blob at a tarpit that never answers: the fetch polls
    at most a few of them, briefly, and still completes from the real holders."""
    import time

    from pyrsia_core._wire import open_frame, seal

    from pyrsia_core import Ed25519Signer

    async def tarpit(frame: bytes) -> bytes:
        if open_frame(frame, now=time.time()).type == "GET_PARTS":
            await anyio.sleep(3600)
        return b"not a frame"  # anything else: refused at once

    async def no_blob(digest: Digest, offset: int) -> None:
        await anyio.sleep(3600)

    swarm.memory.serve("memory://tarpit", tarpit, no_blob)
    victim = swarm.fetchers[0]
    for i in range(20):
        frame = seal(Ed25519Signer.from_seed(bytes([i + 1]) * 32), "ADD_PROVIDER",
                     {"keys": [DIGEST.hex]}, address="memory://tarpit", now=time.time())
        await victim.peers.handle(frame)
    started = time.monotonic()
    with anyio.fail_after(40):
        await victim.peers.fetch(DIGEST)
    assert await victim.blobs.read_bytes(DIGEST) == BLOB
    assert time.monotonic() - started < 12
