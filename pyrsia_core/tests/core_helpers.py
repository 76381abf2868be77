"""Shared builders for the core tests."""

from __future__ import annotations

from collections.abc import Sequence

from pyrsia_core import (
    CommittedBlock,
    Ed25519Signer,
    Ledger,
    Record,
    SignedRecord,
    make_genesis,
)


def signer(n: int) -> Ed25519Signer:
    return Ed25519Signer.from_seed(bytes([n]) * 32)


def artifact_records(
    author: Ed25519Signer, n: int, *, package: str = "alpine:3.16.2", timestamp: int = 1_700_000_000
) -> list[SignedRecord]:
    out = []
    for i in range(n):
        hex_ = f"{i:064x}"
        r = Record.new(
            signer=author,
            package_type="Docker",
            package_specific_id=package,
            package_specific_artifact_id=f"alpine@sha256:{hex_}",
            artifact_hash=hex_,
            num_artifacts=n,
            timestamp=timestamp,
        )
        out.append(SignedRecord.sign(r, author))
    return out


def genesis(validators: Sequence[Ed25519Signer], origin: str = "test/net") -> CommittedBlock:
    return make_genesis(origin=origin, validators=list(validators), timestamp=1_700_000_000)


def commit(
    ledger: Ledger,
    records: Sequence[SignedRecord],
    validators: Sequence[Ed25519Signer],
    *,
    proposer: Ed25519Signer | None = None,
    timestamp: int = 1_700_000_100,
    signers: Sequence[Ed25519Signer] | None = None,
) -> CommittedBlock:
    """Propose a block and have ``signers`` (default: all validators) sign its checkpoint."""
    from pyrsia_core import block_checkpoint, sign_checkpoint

    proposer = proposer or validators[0]
    block = ledger.propose(proposer=proposer, records=records, timestamp=timestamp)
    signers = validators if signers is None else signers
    note = sign_checkpoint(
        block_checkpoint(ledger.origin, block),
        [(f"{ledger.origin}/{s.node_id}", s) for s in signers],
    )
    return CommittedBlock(block, note)
