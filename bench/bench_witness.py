"""Commit-to-cosigned latency with 3 witnesses (issue: witnesses).

    python bench/bench_witness.py [--commits 50] [--witnesses 3]

A build node (a network of one, run in this process so that its commits can be timed
directly) and ``--witnesses`` witness nodes (``pyrsia node start --witness-key``, each its
own process on 127.0.0.1). Each round commits one block of one record and waits until
the witnesses' cosignatures are stored with its certificate.

Reported, measured in the same run: the median commit alone (propose, sign, validate,
one atomic LevelDB batch), the median commit-to-cosigned time, and the median of their
difference -- what witnessing adds over the commit itself (goal: < 50 ms): the
add-checkpoint requests (consistency proof, quorum check, the witness's atomic
state write, its Ed25519 cosignature) to all witnesses at once, and the stored update.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.net import free_port
from support.node import NodeProcess

from pyrsia_core import Cosigner, Ed25519Signer, Record
from pyrsia_registry import NodeConfig, parse_witness_target, start_node

GOAL_MS = 50.0


async def run(commits: int, count: int, work: Path) -> None:
    keys = []
    for i in range(count):
        data = work / f"w{i}" / "data"
        data.mkdir(parents=True)
        node_key, witness_key = Ed25519Signer.generate(), Ed25519Signer.generate()
        (data / "node.key").write_bytes(node_key.to_pem())
        (data / "witness.key").write_bytes(witness_key.to_pem())
        keys.append((data, Cosigner(f"pyrsia-witness/{node_key.node_id}",
                                    witness_key.public_key), free_port()))
    config = NodeConfig(
        host="127.0.0.1", port=free_port(), data_dir=work / "build", upstream=None,
        sync_interval=0.5,
        witnesses=tuple(parse_witness_target(f"http://127.0.0.1:{port},{c.vkey()}")
                        for _, c, port in keys),
    )
    procs: list[NodeProcess] = []
    async with start_node(config) as running:
        try:
            for i, (data, _, port) in enumerate(keys):
                p = NodeProcess(work / f"w{i}", port=port, data_dir=data,
                                extra=("--sync-interval", "0.5", "--peer", running.url,
                                       "--witness-key", "--log-level", "warning"))
                await anyio.to_thread.run_sync(p.start)
                procs.append(p)
            node, witnesses = running.node, running.node.witnesses
            commit_ms, cosigned_ms, extra_ms, missing = [], [], [], 0
            for i in range(commits + 3):  # the first 3 warm up connections and caches
                record = Record.new(
                    signer=node.signer, package_type="Docker",
                    package_specific_id=f"bench/w{i}:1.0",
                    package_specific_artifact_id=f"bench/w{i}:1.0",
                    artifact_hash=f"{i:064x}", num_artifacts=1, timestamp=int(time.time()))
                seen = len(witnesses.latencies)
                t0 = time.perf_counter()
                committed = await node.commit([record])
                t1 = time.perf_counter()
                with anyio.fail_after(30):
                    while len(witnesses.latencies) == seen:  # noqa: ASYNC110 -- 0.5 ms poll
                        await anyio.sleep(0.0005)
                t2 = time.perf_counter()
                cert = await node.log_store.certificate(committed.block.height)
                have = sum(1 for _, c, _ in keys if any(c.matches(s) for s in cert.signatures))
                if i < 3:
                    continue
                missing += count - have
                commit_ms.append((t1 - t0) * 1000)
                cosigned_ms.append((t2 - t0) * 1000)
                extra_ms.append((t2 - t1) * 1000)
        finally:
            for p in procs:
                await anyio.to_thread.run_sync(p.stop)
    med = statistics.median
    print(f"bench_witness: {commits} commits, {count} witnesses (separate processes), "
          f"{missing} cosignature(s) missing")
    print(f"  commit alone             median {med(commit_ms):7.2f} ms")
    print(f"  commit -> cosigned       median {med(cosigned_ms):7.2f} ms  "
          f"(p90 {statistics.quantiles(cosigned_ms, n=10)[-1]:.2f} ms)")
    print(f"  cosigning over commit    median {med(extra_ms):7.2f} ms  "
          f"(ratio {med(cosigned_ms) / med(commit_ms):.2f}x the commit; goal < {GOAL_MS:g} ms)"
          f"  {'OK' if med(extra_ms) < GOAL_MS and not missing else 'MISSED'}")


def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=50)
    parser.add_argument("--witnesses", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyrsia-bench-witness-") as tmp:
        anyio.run(run, args.commits, args.witnesses, Path(tmp))


if __name__ == "__main__":
    main()
