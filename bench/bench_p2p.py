"""Peer-to-peer benchmarks (issue: peer-to-peer), each against a baseline in the same run.

    python bench/bench_p2p.py [--mib 512] [--records 100000]

1. Peer fetch: node B (no upstream) pulls a ``--mib`` MiB blob that only node A holds,
   through B's OCI API with curl (B finds A as provider, streams, verifies, stores,
   then serves). Baseline: the least work a verified copy needs -- nginx serving the
   same file, ``curl | tee file | sha256sum``. Goal ratio >= 0.9. Peak RSS of both
   nodes over idle (goal < 100 MB).
2. Ledger sync: node B joins A, whose ledger holds ``--records`` records, and validates
   every block (signatures, roots, certificates). Goal < 10 s for 100,000.
"""

from __future__ import annotations

import argparse
import hashlib
import os
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

from bench_serve import start_nginx, stop
from support.node import NodeProcess

from pyrsia_core import Digest, Record
from pyrsia_registry import Node, NodeConfig

FAST = ("--sync-interval", "0.5")


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def make_file(path: Path, mib: int) -> str:
    h = hashlib.sha256()
    chunk = os.urandom(1024 * 1024)
    with open(path, "wb") as f:
        for i in range(mib):
            piece = chunk[:-8] + i.to_bytes(8, "big")
            h.update(piece)
            f.write(piece)
    return h.hexdigest()


async def seed_node(data_dir: Path, blob: Path | None, records: int) -> None:
    """Prepare node A's data dir: the blob in its store and the records in its ledger."""
    node = await Node.open(NodeConfig(data_dir=data_dir, upstream=None))
    try:
        now = int(node.clock.now())
        if blob is not None:
            async def chunks():  # type: ignore[no-untyped-def]
                with open(blob, "rb") as f:  # noqa: ASYNC230 - a benchmark seed step
                    while data := f.read(1 << 20):
                        yield data

            info = await node.blobs.put(chunks())
            await node.commit([Record.new(
                signer=node.signer, package_type="Docker", package_specific_id="big:1.0",
                package_specific_artifact_id=f"big@{info.digest}", artifact_hash=info.digest.hex,
                num_artifacts=1, timestamp=now)])
        for start in range(0, records, 10_000):
            batch = [Record.new(
                signer=node.signer, package_type="Docker", package_specific_id=f"img{i}:1",
                package_specific_artifact_id=f"img{i}@sha256:{i:064x}",
                artifact_hash=f"{i:064x}", num_artifacts=1, timestamp=now)
                for i in range(start, min(records, start + 10_000))]
            await node.commit(batch)
    finally:
        await node.aclose()


def height(node: NodeProcess) -> int:
    return int(httpx.get(f"{node.url}/api/status", timeout=60).json()["ledger_height"])


def bench_fetch(work: Path, mib: int) -> None:
    src = work / "blob.bin"
    hex_ = make_file(src, mib)
    digest = Digest(hex_)
    anyio.run(seed_node, work / "a" / "data", src, 0)
    # Baseline: nginx -> curl | tee | sha256sum
    (work / "nginx").mkdir()
    proc, port = start_nginx(work / "nginx", src.parent)
    url = f"http://127.0.0.1:{port}/{src.name}"
    def speed(u: str) -> float:
        out = subprocess.run(["curl", "-sf", "-o", "/dev/null", "-w", "%{speed_download}", u],
                             check=True, capture_output=True, text=True).stdout
        return float(out)

    try:
        nginx_speeds = sorted(speed(url) for _ in range(5))
        a = NodeProcess(work / "a", upstream=None, extra=FAST).start()
        try:
            assert a.proc is not None
            idle = rss_kib(a.proc.pid)[0]
            node_url = f"{a.url}/v2/library/big/blobs/{digest}"
            node_speeds = sorted(speed(node_url) for _ in range(5))
            peak = (rss_kib(a.proc.pid)[1] - idle) / 1024
        finally:
            a.stop()
        n_med, p_med = nginx_speeds[2], node_speeds[2]
        print(f"cache hit     {mib} MiB blob through a node's OCI API {p_med / 1e6:,.0f} MB/s vs "
              f"nginx sendfile {n_med / 1e6:,.0f} MB/s (curl, median of 5): ratio "
              f"{p_med / n_med:.2f}x (goal >= 0.9x); node RSS over idle {peak:.1f} MB")
        print(f"cache_hit_ratio={p_med / n_med:.3f}")
        base = []
        for _ in range(3):
            out = work / "copy.bin"
            os.sync()  # each measure starts without others' dirty pages (see _common)
            t = time.perf_counter()
            subprocess.run(f"set -o pipefail; curl -sf {url} | tee {out} | sha256sum",
                           shell=True, check=True, stdout=subprocess.DEVNULL,
                           executable="/bin/bash")
            base.append(time.perf_counter() - t)
            out.unlink()
    finally:
        stop(proc)
    baseline = min(base)
    runs = []
    peaks = []
    for run in range(3):
        a = NodeProcess(work / "a", upstream=None, extra=FAST).start()
        b = NodeProcess(work / f"b{run}", upstream=None, extra=(*FAST, "--peer", a.url)).start()
        try:
            while height(b) < height(a):
                time.sleep(0.05)
            idle = {p.proc.pid: rss_kib(p.proc.pid)[0] for p in (a, b) if p.proc}
            os.sync()
            t = time.perf_counter()
            subprocess.run(["curl", "-sf", "-o", "/dev/null",
                            f"{b.url}/v2/library/big/blobs/{digest}"], check=True)
            runs.append(time.perf_counter() - t)
            peaks.append(max((rss_kib(pid)[1] - idle[pid]) / 1024 for pid in idle))
            assert "pulled from peer" in b.log(), b.log()[-2000:]
        finally:
            b.stop()
            a.stop()
    best = min(runs)
    mb = mib * 1024 * 1024 / 1e6
    print(f"peer fetch    {mib} MiB: node B via peer A {best:.2f} s ({mb / best:,.0f} MB/s); "
          f"baseline nginx -> curl | tee | sha256sum {baseline:.2f} s ({mb / baseline:,.0f} MB/s)")
    print(f"              ratio {baseline / best:.2f}x (goal >= 0.9x); peak RSS over idle "
          f"{max(peaks):.1f} MB (goal < 100 MB)")
    print(f"peer_fetch_ratio={baseline / best:.3f}")


def bench_sync(work: Path, records: int) -> None:
    anyio.run(seed_node, work / "s" / "data", None, records)
    with NodeProcess(work / "s", upstream=None, extra=FAST) as a:
        target = height(a)
        t = time.perf_counter()
        with NodeProcess(work / "joiner", upstream=None, extra=(*FAST, "--peer", a.url)) as b:
            while height(b) < target:
                time.sleep(0.05)
            took = time.perf_counter() - t
    print(f"ledger sync   {records:,} records ({target} blocks) validated by a joining node in "
          f"{took:.2f} s (goal < 10 s)")
    print(f"sync_seconds={took:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-p2p-"))
    work.chmod(0o755)  # nginx workers run as an unprivileged user
    try:
        bench_fetch(work, args.mib)
        bench_sync(work, args.records)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
