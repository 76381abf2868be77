"""The consensus runner's bookkeeping on a real node (in memory): committed records are
never pending or proposed again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from pyrsia_registry._consensus_node import ConsensusRunner
from pyrsia_registry._priority import ConsensusPriority, urgent
from support.memnodes import memory_node

from pyrsia_core import Block, Digest, Record, SignedRecord

pytestmark = pytest.mark.anyio


async def test_a_late_pending_never_brings_committed_records_back(tmp_path: Path) -> None:
    node = await memory_node(tmp_path, "n", None)
    sent: list[tuple[str, Any]] = []

    async def rebuild(block: Block) -> bool:
        return True

    async def send(type_: str, body: Any, ids: list[str], attachment: bytes | None = None) -> None:
        sent.append((type_, body))

    try:
        runner = ConsensusRunner(node, rebuild, send)
        record = Record.new(signer=node.signer, package_type="Docker",
                            package_specific_id="x:1", package_specific_artifact_id="x:1",
                            artifact_hash="ab" * 32, num_artifacts=1,
                            timestamp=int(node.clock.now()))
        committed = await node.commit([record])
        runner.on_block(committed)
        (signed,) = committed.block.records
        # The PENDING for it arrives after its block: ignored.
        runner.add_pending([signed.to_json()], node.node_id)
        assert runner.pending == {}
        # A proposal repeating it gets a nil vote.
        again = node.log_store.ledger.propose(
            proposer=node.signer, records=[signed], timestamp=int(node.clock.now()))
        assert runner._build_check(again) is False
        # A new record is taken.
        fresh = SignedRecord.sign(Record.new(
            signer=node.signer, package_type="Docker", package_specific_id="y:1",
            package_specific_artifact_id="y:1", artifact_hash="cd" * 32, num_artifacts=1,
            timestamp=int(node.clock.now())), node.signer)
        runner.add_pending([fresh.to_json()], node.node_id)
        assert list(runner.pending) == [fresh.record.id]
    finally:
        await node.aclose()


def _record(node: Any, name: str) -> SignedRecord:
    return SignedRecord.sign(Record.new(
        signer=node.signer, package_type="Docker", package_specific_id=f"{name}:1",
        package_specific_artifact_id=f"{name}:1", artifact_hash=Digest.of(name.encode()).hex,
        num_artifacts=1, timestamp=int(node.clock.now())), node.signer)


async def test_a_proposal_holds_what_one_quorum_all_rebuilt(tmp_path: Path) -> None:
    """Records vouched by a quorum each, but by different quorums, would leave every
    build node something to rebuild while the round runs: the proposer takes the
    records of the one quorum that covers most, and the rest once their vouches stall."""
    node = await memory_node(tmp_path, "n", None)

    async def rebuild(block: Block) -> bool:
        return True

    async def send(type_: str, body: Any, ids: list[str], attachment: bytes | None = None) -> None:
        pass

    try:
        runner = ConsensusRunner(node, rebuild, send)
        me = node.node_id
        a, b, c = "a" * 64, "b" * 64, "c" * 64
        r1, r2, r3, r4 = (_record(node, n) for n in ("r1", "r2", "r3", "r4"))
        for sr, vouchers in ((r1, {a, b}), (r2, {b, c}), (r3, {a, b, c}), (r4, {a, b})):
            runner._add(sr)
            runner.vouchers[sr.record.id] |= vouchers
        now = node.clock.monotonic()
        ready = [r1, r2, r3, r4]
        chosen = runner._quorum_vouched(ready, [me, a, b, c], 3, now)
        assert [sr.record.id for sr in chosen] == [r1.record.id, r3.record.id, r4.record.id]
        # r2 waited vouch_wait, but a (missing from its vouchers) is still vouching: wait.
        runner._pending_since[r2.record.id] = now - runner.vouch_wait - 1
        runner._last_vouch[a] = now - 0.1
        assert r2 not in runner._quorum_vouched(ready, [me, a, b, c], 3, now)
        # ... but not forever.
        runner._pending_since[r2.record.id] = now - runner.vouch_max
        assert r2 in runner._quorum_vouched(ready, [me, a, b, c], 3, now)
        runner._pending_since[r2.record.id] = now - runner.vouch_wait - 1
        # a went quiet (down, or it lost the PENDING): r2 is proposed all the same.
        runner._last_vouch[a] = now - runner.vouch_idle - 1
        assert r2 in runner._quorum_vouched(ready, [me, a, b, c], 3, now)
        # No quorum vouched anything: nothing fresh is proposed.
        assert runner._quorum_vouched([r1], [me, a, b, c, "d" * 64], 4, now) == []
    finally:
        await node.aclose()


async def test_bulk_work_waits_while_a_height_is_decided() -> None:
    priority = ConsensusPriority(hold_max=5.0)
    priority.hold(7)
    assert priority.holding
    passed = anyio.Event()

    async def bulk() -> None:
        await priority.wait()
        passed.set()

    async def vote_rebuild() -> None:
        with urgent():
            await priority.wait()  # what a vote waits for never waits here

    async with anyio.create_task_group() as tg:
        tg.start_soon(bulk)
        with anyio.fail_after(1):
            await vote_rebuild()
        await anyio.sleep(0.05)
        assert not passed.is_set()
        priority.release()  # the block committed
        with anyio.fail_after(1):
            await passed.wait()
    # One hold per height, and never longer than hold_max.
    priority.hold(7)
    assert not priority.holding
    short = ConsensusPriority(hold_max=0.05)
    short.hold(8)
    with anyio.fail_after(1):
        await short.wait()
    assert not short.holding
