"""Memory of a cold node streaming one 1 GiB layer to many clients while it builds it
(issue #14).

    python bench/bench_stream_memory.py [--mib 1024] [--clients 8] [--runs 3]

A one-layer image whose layer is ``--mib`` MiB (seeded random bytes, written to a file in
1 MiB chunks and pushed with the registry's HTTP API) is in a local Debian
``docker-registry``. For each run, a fresh node (``pyrsia node start``) with that
upstream; once it is idle (2 s after start) its ``VmRSS`` is read; then ``--clients``
clients start together, each a ``curl`` of the manifest (the first one starts the build)
followed by a ``curl`` of the layer to ``/dev/null``: every client streams the layer
while it arrives from the upstream. The node's ``VmRSS`` is sampled every 20 ms and its
``VmHWM`` read at the end. Reported: idle RSS, peak RSS and peak over idle (worst and
median of the runs). Goal: peak over idle < 64 MB. Prints
``stream_peak_over_idle_mib=<worst>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ACCEPT, MIB, Image, RssSampler, kib, push_image
from support.node import NodeProcess
from support.registry import UpstreamRegistry

GOAL_BYTES = 64_000_000
TIMEOUT = 900


def client(node: NodeProcess, image: Image, sizes: list[int], errors: list[str]) -> None:
    """The manifest, then its one layer to /dev/null; the bytes received go to ``sizes``."""
    try:
        out = subprocess.run(
            ["curl", "-sf", "--max-time", str(TIMEOUT), "-H", f"Accept: {ACCEPT}",
             f"{node.url}/v2/{image.repo}/manifests/{image.tag}"],
            check=True, capture_output=True, timeout=TIMEOUT).stdout
        (layer,) = json.loads(out)["layers"]
        got = subprocess.run(
            ["curl", "-sf", "--max-time", str(TIMEOUT), "-o", "/dev/null",
             "-w", "%{size_download}", f"{node.url}/v2/{image.repo}/blobs/{layer['digest']}"],
            check=True, capture_output=True, text=True, timeout=TIMEOUT).stdout
        sizes.append(int(got))
    except (subprocess.SubprocessError, ValueError, KeyError) as exc:
        errors.append(repr(exc))


def one_run(reg: UpstreamRegistry, image: Image, work: Path, clients: int,
            log_level: str) -> tuple[int, int, float]:
    """(idle KiB, peak KiB, seconds until the last client was done) of one fresh node."""
    with NodeProcess(work, upstream=reg.url, extra=("--log-level", log_level)) as node:
        assert node.proc is not None
        pid = node.proc.pid
        time.sleep(2.0)  # settle after start
        idle = kib(pid, "VmRSS")
        mark = reg.mark()
        sizes: list[int] = []
        errors: list[str] = []
        threads = [threading.Thread(target=client, args=(node, image, sizes, errors))
                   for _ in range(clients)]
        with RssSampler(pid) as sampler:
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            took = time.perf_counter() - t
        hwm = kib(pid, "VmHWM")
        if errors or sizes != [image.total_bytes] * clients:
            raise SystemExit(f"a client failed: {errors} {sizes}\n{node.log()[-3000:]}")
        fetches = reg.blob_fetches_since(mark)
        layer_fetches = sum(p.endswith(image.layer_digests[0]) for p in fetches)
        if layer_fetches != 1:
            raise SystemExit(f"the upstream served the layer {layer_fetches} times")
        return idle, max(max(sampler.samples, default=0), hwm), took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--log-level", default="info", help="the nodes' --log-level")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-stream-mem-"))
    try:
        with UpstreamRegistry(work / "upstream") as reg:
            image = push_image(reg.url, "library/big", "1.0", layers=1,
                               total_bytes=args.mib * MIB, work=work / "push",
                               seed=f"bench-stream-memory-{args.mib}")
            results = []
            for run in range(args.runs):
                results.append(one_run(reg, image, work / f"node{run}", args.clients,
                                       args.log_level))
                shutil.rmtree(work / f"node{run}", ignore_errors=True)
        overs = [(peak - idle) / 1024 for idle, peak, _ in results]
        worst = max(overs)
        print(f"layer: {args.mib} MiB, {args.clients} clients streaming it from a cold node "
              f"(each: manifest, then the layer to /dev/null), {args.runs} run(s)")
        for idle, peak, took in results:
            print(f"  idle {idle / 1024:6.1f} MiB, peak {peak / 1024:6.1f} MiB, over idle "
                  f"{(peak - idle) / 1024:5.1f} MiB; last client done after {took:.1f} s "
                  f"({args.mib * args.clients / took:.0f} MiB/s served)")
        goal_mib = GOAL_BYTES / MIB
        print(f"  peak over idle: worst {worst:.1f} MiB, median {statistics.median(overs):.1f} "
              f"MiB (goal < 64 MB = {goal_mib:.1f} MiB: "
              f"{'met' if worst * MIB < GOAL_BYTES else 'NOT met'})")
        print(f"stream_peak_over_idle_mib={worst:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
