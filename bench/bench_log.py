"""Transparency-log benchmarks (issue: foundation): append, proofs, checkpoints, reload.

    python bench/bench_log.py [--records 1000000] [--block 10000]

Each figure is printed with its goal, and with a ratio against a baseline measured
in the same run where one exists:

* append: ``LogStore.append`` (full block validation -- record signatures, Merkle
  root, quorum certificate -- plus one atomic LevelDB batch per block) against the
  baseline of writing the same record bytes to the same LevelDB with plain batches.
* reload: ``LogStore.open`` of the 1M-record store against a plain scan of the
  stored Merkle pages (the least a reload that does not rehash can do).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import anyio
from pyrsia_storage_leveldb import LevelDBStore

from pyrsia_core import (
    CommittedBlock,
    Ed25519Signer,
    LogStore,
    NoteVerifier,
    Record,
    SignedRecord,
    block_checkpoint,
    make_genesis,
    open_checkpoint,
    sign_checkpoint,
    verify_consistency,
    verify_inclusion,
)

SEEDS = [bytes([i]) * 32 for i in range(1, 5)]


def _make_records(args: tuple[int, int, int]) -> list[bytes]:
    """Sign ``count`` records (run in worker processes: signing 1M records takes a while)."""
    start, count, author = args
    signer = Ed25519Signer.from_seed(SEEDS[author])
    out = []
    for i in range(start, start + count):
        hex_ = f"{i:064x}"
        r = Record.new(
            signer=signer,
            package_type="Docker",
            package_specific_id=f"image{i // 4}:1.0",
            package_specific_artifact_id=f"image{i // 4}@sha256:{hex_}",
            artifact_hash=hex_,
            num_artifacts=4,
            timestamp=1_700_000_000,
        )
        out.append(SignedRecord.sign(r, signer).to_bytes())
    return out


def generate(n: int, block: int) -> list[list[SignedRecord]]:
    chunks = [(s, min(block, n - s), 0) for s in range(0, n, block)]
    with ProcessPoolExecutor(os.cpu_count() or 2) as pool:
        raw_blocks = list(pool.map(_make_records, chunks))
    return [[SignedRecord.from_bytes(b) for b in raw] for raw in raw_blocks]


def us(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} µs"


async def main(n: int, block: int) -> None:
    validators = [Ed25519Signer.from_seed(s) for s in SEEDS]
    t = time.perf_counter()
    blocks = generate(n, block)
    print(f"generated {n:,} signed records in {time.perf_counter() - t:.1f} s "
          f"({len(blocks)} blocks of {block:,})")
    tmp = Path(tempfile.mkdtemp(prefix="pyrsia-bench-"))

    # -- baseline: the same bytes into LevelDB with plain batches
    base = LevelDBStore(tmp / "baseline")
    t = time.perf_counter()
    index = 0
    for records in blocks:
        async with base.batch() as b:
            for sr in records:
                b.put(b"r/" + index.to_bytes(8, "big"), sr.to_bytes())
                index += 1
    baseline_s = time.perf_counter() - t
    await base.aclose()

    # -- append through the ledger (validation + indexes + Merkle pages)
    kv = LevelDBStore(tmp / "ledger")
    genesis = make_genesis(origin="bench/net", validators=validators, timestamp=1_700_000_000)
    from pyrsia_registry._verify import ParallelRecordVerifier

    verifier = ParallelRecordVerifier()
    store = await LogStore.open(kv, genesis, record_verifier=verifier)
    names = [(f"bench/net/{v.node_id}", v) for v in validators]
    append_s = 0.0
    for records in blocks:
        b = store.ledger.propose(proposer=validators[0], records=records, timestamp=1_700_000_001)
        cert = sign_checkpoint(block_checkpoint(store.ledger.origin, b), names)
        t = time.perf_counter()
        await store.append(CommittedBlock(b, cert))
        append_s += time.perf_counter() - t
    size = store.ledger.tree.size
    verifier.close()
    print(f"\nappend        {n / append_s:10,.0f} records/s   (goal >= 10,000/s)  "
          f"{append_s:.2f} s; baseline raw LevelDB batches {n / baseline_s:,.0f} records/s, "
          f"ratio {baseline_s / append_s:.2f}x; signatures checked on {verifier.workers} cores")

    # -- proofs at full size
    tree = store.ledger.tree
    root = tree.root()
    import random

    rng = random.Random(1)
    idx = [rng.randrange(size) for _ in range(2000)]
    t = time.perf_counter()
    proofs = [tree.inclusion_proof(i) for i in idx]
    gen = (time.perf_counter() - t) / len(idx)
    leaves = [tree.leaf(i) for i in idx]
    t = time.perf_counter()
    for i, leaf, p in zip(idx, leaves, proofs, strict=True):
        verify_inclusion(leaf, i, size, p, root)
    ver = (time.perf_counter() - t) / len(idx)
    print(f"inclusion     generate {us(gen)}, verify {us(ver)}  (goal < 1 ms each) "
          f"at {size:,} leaves, {len(proofs[0])} hashes")
    olds = [rng.randrange(1, size) for _ in range(2000)]
    t = time.perf_counter()
    cps = [tree.consistency_proof(o) for o in olds]
    cgen = (time.perf_counter() - t) / len(olds)
    old_roots = [tree.root(o) for o in olds]
    t = time.perf_counter()
    for o, r, p in zip(olds, old_roots, cps, strict=True):
        verify_consistency(o, size, r, root, p)
    cver = (time.perf_counter() - t) / len(olds)
    print(f"consistency   generate {us(cgen)}, verify {us(cver)}")

    # -- checkpoint verification with 4 signatures (threshold 3)
    cert = await store.certificate(store.ledger.height)
    assert cert is not None
    text = cert.to_text()
    verifiers = [NoteVerifier(n_, v.public_key) for n_, v in names]
    reps = 500
    t = time.perf_counter()
    for _ in range(reps):
        open_checkpoint(text, verifiers, 3)
    cp = (time.perf_counter() - t) / reps
    print(f"checkpoint    verify (4 signatures, threshold 3) {us(cp)}")
    await store.aclose() if hasattr(store, "aclose") else None
    await kv.aclose()

    # -- reload
    kv = LevelDBStore(tmp / "ledger")
    t = time.perf_counter()
    pages = 0
    async for _k, _v in kv.scan(b"m/"):
        pages += 1
    scan_s = time.perf_counter() - t
    t = time.perf_counter()
    again = await LogStore.open(kv)
    reload_s = time.perf_counter() - t
    assert again.ledger.tree.root() == root
    print(f"reload        {reload_s:.2f} s for {size:,} records (goal < 2 s); "
          f"baseline scan of the {pages} Merkle pages {scan_s:.2f} s, "
          f"ratio {scan_s / reload_s:.2f}x")
    await kv.aclose()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--block", type=int, default=10_000)
    a = parser.parse_args()
    anyio.run(main, a.records, a.block)
    sys.stdout.flush()
