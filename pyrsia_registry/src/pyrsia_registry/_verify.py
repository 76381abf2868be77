"""Record signature checks spread over worker processes, for large blocks (sync)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from pyrsia_core._records import verify_records
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
                raise SignatureError(error)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
