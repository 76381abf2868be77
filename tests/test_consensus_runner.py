"""The consensus runner's bookkeeping on a real node (in memory): committed records are
never pending or proposed again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pyrsia_registry._consensus_node import ConsensusRunner
from support.memnodes import memory_node

from pyrsia_core import Block, Record, SignedRecord

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
