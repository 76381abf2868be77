"""Record signature checks spread over worker processes, for large blocks (sync)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from pyrsia_core._records import VERIFIED, verify_records
from pyrsia_core.errors import SignatureError

from pyrsia_core import Ed25519Verifier, PublicKey, SignedRecord

__all__ = ["ParallelRecordVerifier"]


_KEYS: dict[bytes, Ed25519Verifier] = {}


def _verify_chunk(args: tuple[int, list[tuple[bytes, bytes, bytes]]]) -> str | None:
    """Check (public key, signature, canonical record bytes) triples; the first failure wins."""
    offset, items = args
    for i, (key, signature, payload) in enumerate(items):
        verifier = _KEYS.get(key)
        try:
            if verifier is None:
                verifier = _KEYS[key] = Ed25519Verifier(PublicKey(key))
            verifier.verify(signature, payload)
        except (SignatureError, ValueError) as exc:
            return f"record {offset + i}: {exc}"
    return None


def _renumber(error: str, positions: Sequence[int]) -> str:
    """``record 3: ...`` of a filtered list -> the record's number in the block."""
    head, _, rest = error.partition(":")
    try:
        return f"record {positions[int(head.split()[1])]}:{rest}"
    except (IndexError, ValueError):
        return error


class ParallelRecordVerifier:
    """Callable like :func:`pyrsia_core._records.verify_records`, using all cores for big blocks.

    The checks are exactly the core's; only where they run differs. Blocks smaller
    than ``threshold`` records are checked inline.
    """

    def __init__(self, workers: int | None = None, threshold: int = 2048) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.threshold = threshold
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, records: Sequence[SignedRecord]) -> None:
        if len(records) < self.threshold or self.workers < 2:
            verify_records(records)
            return
        # Records this process verified before (pending, proposed) are not sent again.
        keys = [VERIFIED.key(r) for r in records]
        todo = [(i, r) for i, (r, k) in enumerate(zip(records, keys, strict=True))
                if k not in VERIFIED]
        if len(todo) < self.threshold:
            for i, r in todo:
                try:
                    r.verify()
                except SignatureError as exc:
                    raise SignatureError(f"record {i} ({r.record.id}): {exc}") from None
            return
        # Big blocks come from ledger sync: their records are not met again, so they
        # are not remembered.
        self._parallel([r for _, r in todo], [i for i, _ in todo])

    def _parallel(self, records: Sequence[SignedRecord], positions: Sequence[int]) -> None:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers)
        size = -(-len(records) // self.workers)
        chunks = [
            (
                i,
                [
                    (r.record.public_key.raw, r.signature, r.record.canonical())
                    for r in records[i : i + size]
                ],
            )
            for i in range(0, len(records), size)
        ]
        for error in self._pool.map(_verify_chunk, chunks):
            if error is not None:
                raise SignatureError(_renumber(error, positions))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
