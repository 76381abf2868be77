"""Ledger rules: every bad block is rejected with a BlockError naming the rule."""

from __future__ import annotations

import attrs
import pytest
from core_helpers import artifact_records, commit, genesis, signer
from pyrsia_core.errors import BlockError

from pyrsia_core import (
    Block,
    CommittedBlock,
    Ledger,
    Record,
    SignedRecord,
    ValidatorSet,
    quorum_threshold,
)


def four() -> list:
    return [signer(i) for i in range(1, 5)]


def test_quorum_threshold() -> None:
    assert [quorum_threshold(n) for n in (1, 2, 3, 4, 5, 6, 7, 10)] == [1, 2, 3, 3, 4, 5, 5, 7]
    with pytest.raises(ValueError):
        quorum_threshold(0)


def test_genesis_and_append() -> None:
    vals = four()
    g = genesis(vals)
    ledger = Ledger.start(g)
    assert ledger.height == 0 and len(ledger.validators) == 4 and ledger.tree.size == 4
    block = commit(ledger, artifact_records(vals[1], 3), vals, proposer=vals[2])
    ledger.append(block)
    assert ledger.height == 1 and ledger.tree.size == 7 and ledger.head_hash == block.block.hash
    # Round trip through bytes keeps the hash and validates on another ledger.
    other = Ledger.start(g)
    other.append(CommittedBlock.from_bytes(block.to_bytes()))
    assert other.tree.root() == ledger.tree.root()


def test_quorum_needs_more_than_two_thirds() -> None:
    vals = four()
    ledger = Ledger.start(genesis(vals))
    records = artifact_records(vals[0], 2)
    with pytest.raises(BlockError) as info:
        ledger.append(commit(ledger, records, vals, signers=vals[:2]))
    assert info.value.rule == "quorum"
    ledger.append(commit(ledger, records, vals, signers=vals[1:]))  # 3 of 4 is enough


def test_signatures_of_outsiders_do_not_count() -> None:
    vals = four()
    ledger = Ledger.start(genesis(vals))
    outsiders = [signer(i) for i in range(10, 14)]
    with pytest.raises(BlockError) as info:
        ledger.append(
            commit(ledger, artifact_records(vals[0], 1), vals, signers=vals[:2] + outsiders)
        )
    assert info.value.rule == "quorum"


def _tampered(ledger: Ledger, vals: list, **changes: object) -> CommittedBlock:
    """A block with ``changes`` applied, then signed by every validator (so only the rule fails)."""
    from pyrsia_core import block_checkpoint, sign_checkpoint

    good = ledger.propose(
        proposer=vals[0], records=artifact_records(vals[0], 2), timestamp=1_700_000_100
    )
    bad = attrs.evolve(good, **changes)
    note = sign_checkpoint(
        block_checkpoint(ledger.origin, bad), [(f"{ledger.origin}/{s.node_id}", s) for s in vals]
    )
    return CommittedBlock(bad, note)


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"height": 2}, "height"),
        ({"parent": "ab" * 32}, "parent"),
        ({"root": "cd" * 32}, "root"),
        ({"tree_size": 99}, "tree_size"),
        ({"proposer": "ef" * 32}, "proposer"),
        ({"records": ()}, "records"),
        ({"timestamp": 1}, "timestamp"),
    ],
)
def test_each_rule(changes: dict[str, object], rule: str) -> None:
    vals = four()
    ledger = Ledger.start(genesis(vals))
    with pytest.raises(BlockError) as info:
        ledger.append(_tampered(ledger, vals, **changes))
    assert info.value.rule == rule
    assert ledger.height == 0 and ledger.tree.size == 4  # nothing adopted


def test_certificate_for_another_block_is_rejected() -> None:
    vals = four()
    ledger = Ledger.start(genesis(vals))
    a = commit(ledger, artifact_records(vals[0], 1), vals)
    b = commit(ledger, artifact_records(vals[0], 1), vals)
    with pytest.raises(BlockError) as info:
        ledger.append(CommittedBlock(a.block, b.certificate))
    assert info.value.rule == "quorum"


def test_record_signature_and_author_rules() -> None:
    vals = four()
    ledger = Ledger.start(genesis(vals))
    good = artifact_records(vals[0], 1)[0]
    forged = SignedRecord(good.record, bytes(64))
    with pytest.raises(BlockError) as info:
        ledger.append(commit(ledger, [forged], vals))
    assert info.value.rule == "record-signature"
    outsider = signer(42)
    with pytest.raises(BlockError) as info:
        ledger.append(commit(ledger, artifact_records(outsider, 1), vals))
    assert info.value.rule == "record-author"


def test_validator_set_changes_take_effect_next_height() -> None:
    vals = four()
    ledger = Ledger.start(genesis(vals))
    newcomer = signer(5)
    add = SignedRecord.sign(
        Record.node_change(signer=vals[0], subject=newcomer.public_key, timestamp=1_700_000_050),
        vals[0],
    )
    ledger.append(commit(ledger, [add], vals))
    assert newcomer.node_id in ledger.validators and len(ledger.validators) == 5
    # With 5 validators, 3 signatures are no longer a quorum (4 are needed).
    records = artifact_records(newcomer, 1)
    with pytest.raises(BlockError):
        ledger.append(commit(ledger, records, [*vals, newcomer], signers=vals[:3]))
    ledger.append(commit(ledger, records, [*vals, newcomer], signers=[newcomer, *vals[:3]]))
    remove = SignedRecord.sign(
        Record.node_change(
            signer=vals[0], subject=newcomer.public_key, timestamp=1_700_000_060, add=False
        ),
        vals[0],
    )
    ledger.append(commit(ledger, [remove], [*vals, newcomer], signers=vals))
    assert newcomer.node_id not in ledger.validators


def test_removing_a_non_member_is_rejected() -> None:
    vals = four()
    ledger = Ledger.start(genesis(vals))
    remove = SignedRecord.sign(
        Record.node_change(
            signer=vals[0], subject=signer(9).public_key, timestamp=1_700_000_060, add=False
        ),
        vals[0],
    )
    with pytest.raises(BlockError) as info:
        ledger.append(commit(ledger, [remove], vals))
    assert info.value.rule == "validator-set"


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"block": {}, "certificate": "x"}',
        b'{"block": {"height": 1}, "certificate": "o\\n1\\nAAAA\\n\\n"}',
    ],
)
def test_malformed_committed_blocks(data: bytes) -> None:
    with pytest.raises(BlockError):
        CommittedBlock.from_bytes(data)


def test_block_json_with_bad_fields() -> None:
    vals = four()
    ledger = Ledger.start(genesis(vals))
    block = commit(ledger, artifact_records(vals[0], 1), vals).block
    d = block.to_json()
    for key, value in [
        ("height", -1),
        ("parent", "xyz"),
        ("num_records", 5),
        ("extra", 1),
        ("records", [{"record": {}, "signature": "00"}]),
    ]:
        bad = dict(d)
        bad[key] = value
        with pytest.raises(BlockError):
            Block.from_json(bad)


def test_genesis_must_be_self_consistent() -> None:
    vals = four()
    g = genesis(vals)
    with pytest.raises(BlockError):
        Ledger.start(CommittedBlock(attrs.evolve(g.block, root="00" * 32), g.certificate))
    with pytest.raises(BlockError):
        Ledger.start(CommittedBlock(attrs.evolve(g.block, height=1), g.certificate))


def test_validator_set_json() -> None:
    vals = four()
    vs = ValidatorSet.of(v.public_key for v in vals)
    assert set(vs.to_json()) == {v.node_id for v in vals} and vs.threshold == 3
