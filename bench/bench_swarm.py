"""Swarm: 1 seeder + N fetchers of one large blob at once, every upload capped (issue: p2p).

    python bench/bench_swarm.py [--mib 128] [--fetchers 8] [--rate 20MB/s]

Node processes on 127.0.0.1, each started with ``--max-upload-rate`` (standing in for
a real network link; uncapped, loopback would measure only CPU). The seeder holds a
blob with its part list in the log (1 MiB parts, as a build node logs them for any
blob of 8 MiB or more). Measured in the same run:

* alone: one fetcher pulls the blob through its OCI API (every part from the seeder);
* swarm: ``--fetchers`` fresh fetchers pull it at the same moment; the time until the
  last one has it. Fetching everything from the seeder would take N x alone; the goal
  is <= 1.3 x alone, reachable only if fetchers serve each other the parts they hold
  (each part verified against the logged list before it is served on).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_p2p import height, make_file
from support.node import NodeProcess

from pyrsia_core import Digest, Record
from pyrsia_registry import Node, NodeConfig

FAST = ("--sync-interval", "0.5")
PARTS_LINE = re.compile(r"pulled from peers in (\d+) verified parts \((.*)\), ([\d.]+) s")


async def seed(data_dir: Path, blob: Path, digest: Digest) -> None:
    node = await Node.open(NodeConfig(data_dir=data_dir, upstream=None))
    try:
        async def chunks():  # type: ignore[no-untyped-def]
            with open(blob, "rb") as f:  # noqa: ASYNC230 - a benchmark seed step
                while data := f.read(1 << 20):
                    yield data

        await node.blobs.put(chunks(), expected=digest)
        now = int(node.clock.now())
        records = [Record.new(
            signer=node.signer, package_type="Docker", package_specific_id="big:1.0",
            package_specific_artifact_id=f"library/big@{digest}", artifact_hash=digest.hex,
            num_artifacts=1, timestamp=now)]
        records += await node.part_list_records([digest], now)
        assert len(records) == 2, "the blob is below the part-list threshold"
        await node.commit(records)
    finally:
        await node.aclose()


def pull_all(nodes: list[NodeProcess], digest: Digest) -> float:
    """Pull the blob through every node's OCI API at once; seconds until the last is done."""
    t = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", "--max-time", "600",
                               f"{n.url}/v2/library/big/blobs/{digest}"]) for n in nodes]
    for p in procs:
        assert p.wait() == 0, "a pull failed"
    return time.perf_counter() - t


def start_fetchers(work: Path, names: list[str], seeder: NodeProcess,
                   cap: tuple[str, ...]) -> list[NodeProcess]:
    nodes = [NodeProcess(work / n, upstream=None,
                         extra=(*FAST, *cap, "--peer", seeder.url)).start() for n in names]
    target = height(seeder)
    deadline = time.monotonic() + 120
    while any(height(n) < target for n in nodes):
        assert time.monotonic() < deadline, "fetchers did not sync"
        time.sleep(0.1)
    time.sleep(1.5)  # let the routing tables fill (bootstrap + a refresh)
    return nodes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--fetchers", type=int, default=8)
    parser.add_argument("--rate", default="20MB/s")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-swarm-"))
    cap = ("--max-upload-rate", args.rate)
    nodes: list[NodeProcess] = []
    try:
        src = work / "blob.bin"
        digest = Digest(make_file(src, args.mib))
        anyio.run(seed, work / "seed" / "data", src, digest)
        src.unlink()
        seeder = NodeProcess(work / "seed", upstream=None, extra=(*FAST, *cap)).start()
        nodes.append(seeder)
        (alone_node,) = start_fetchers(work, ["alone"], seeder, cap)
        nodes.append(alone_node)
        alone = pull_all([alone_node], digest)
        alone_node.stop()
        fetchers = start_fetchers(work, [f"f{i}" for i in range(args.fetchers)], seeder, cap)
        nodes.extend(fetchers)
        together = pull_all(fetchers, digest)
        seeder_id = httpx.get(f"{seeder.url}/api/status", timeout=30).json()["node_id"][:16]
        from_seeder = parts_total = 0
        for n in fetchers:
            match = PARTS_LINE.search(n.log())
            assert match, n.log()[-3000:]
            parts_total += int(match.group(1))
            for item in match.group(2).split(", "):
                nid, count = item.split(": ")
                if nid == seeder_id:
                    from_seeder += int(count)
        mb = args.mib * (1 << 20) / 1e6
        print(f"swarm         {args.mib} MiB, every node's upload capped at {args.rate}: one "
              f"fetcher alone {alone:.2f} s ({mb / alone:,.0f} MB/s); {args.fetchers} fetchers "
              f"at once {together:.2f} s = {together / alone:.2f}x alone (goal <= 1.3x; all from "
              f"the seeder would be {args.fetchers}x)")
        print(f"              parts served by the seeder: {from_seeder} of {parts_total} "
              f"({from_seeder / parts_total:.0%}); the rest fetchers served each other")
        print(f"swarm_ratio={together / alone:.3f}")
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
