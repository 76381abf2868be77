"""QUIC vs HTTP peer transport, measured in the same run (issue #6).

    python bench/bench_quic.py [--mib 256] [--runs 2]

Node A (build node, ``--transport http,quic``) holds a ``--mib`` MiB blob. A fresh node B
with no upstream joins A over one transport (``--transport http`` or ``--transport quic``)
and pulls the blob through its OCI API with curl: B finds A as the provider, fetches the
blob over that transport, verifies it and serves it. Runs alternate between the two
transports; the best of ``--runs`` per transport is reported (MB/s), with the ratio
QUIC / HTTP and B's peak RSS over idle.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_p2p import height, make_file, rss_kib, seed_node
from support.node import NodeProcess

from pyrsia_core import Digest

FAST = ("--sync-interval", "0.5")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch_once(work: Path, a: NodeProcess, quic_port: int, transport: str, digest: Digest,
               run: int) -> tuple[float, float]:
    """Seconds for B to pull the blob from A over ``transport``; B's peak RSS over idle (MB)."""
    peer = a.url if transport == "http" else f"quic://127.0.0.1:{quic_port}"
    extra = (*FAST, "--transport", transport, "--quic-port", "0", "--peer", peer)
    b = NodeProcess(work / f"b-{transport}-{run}", upstream=None, extra=extra).start()
    try:
        deadline = time.monotonic() + 60
        while height(b) < height(a):
            if time.monotonic() > deadline:
                raise RuntimeError(f"B did not sync over {transport}:\n{b.log()[-2000:]}")
            time.sleep(0.05)
        assert b.proc is not None
        idle = rss_kib(b.proc.pid)[0]
        t = time.perf_counter()
        subprocess.run(["curl", "-sf", "-o", "/dev/null",
                        f"{b.url}/v2/library/big/blobs/{digest}"], check=True)
        elapsed = time.perf_counter() - t
        peak = (rss_kib(b.proc.pid)[1] - idle) / 1024
        assert "pulled from peer" in b.log(), b.log()[-2000:]
        return elapsed, peak
    finally:
        b.stop()
        shutil.rmtree(work / f"b-{transport}-{run}", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-quic-"))
    try:
        src = work / "blob.bin"
        digest = Digest(make_file(src, args.mib))
        anyio.run(seed_node, work / "a" / "data", src, 0)
        src.unlink()
        quic_port = free_udp_port()
        a = NodeProcess(work / "a", upstream=None,
                        extra=(*FAST, "--transport", "http,quic", "--quic-port", str(quic_port)))
        a.start()
        times: dict[str, list[float]] = {"http": [], "quic": []}
        peaks: dict[str, list[float]] = {"http": [], "quic": []}
        try:
            for run in range(args.runs):
                for transport in ("http", "quic"):
                    elapsed, peak = fetch_once(work, a, quic_port, transport, digest, run)
                    times[transport].append(elapsed)
                    peaks[transport].append(peak)
        finally:
            a.stop()
        mb = args.mib * 1024 * 1024 / 1e6
        speed = {t: mb / min(v) for t, v in times.items()}
        for t in ("http", "quic"):
            print(f"peer fetch over {t:4}  {args.mib} MiB: best {min(times[t]):.2f} s "
                  f"({speed[t]:,.0f} MB/s) of {args.runs}; B's peak RSS over idle "
                  f"{max(peaks[t]):.1f} MB")
        print(f"quic_vs_http_ratio={speed['quic'] / speed['http']:.3f} "
              f"(QUIC {speed['quic']:,.0f} MB/s / HTTP {speed['http']:,.0f} MB/s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
