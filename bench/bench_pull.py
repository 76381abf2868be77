"""Cold pull through a fresh node vs skopeo straight from the upstream (issue #14).

    python bench/bench_pull.py [--runs 5] [--image 100x3] [--image 1024x1]
                               [--upstream-rate 50MB/s]

Each ``--image MIBxLAYERS`` (default: a 3-layer 100 MiB image and a 1 GiB single-layer
image) is pushed to a local Debian ``docker-registry`` (layers written to files in 1 MiB
chunks of seeded random bytes, pushed with the registry's HTTP API). Interleaved, run by
run (the order swapped every run): baseline ``skopeo copy`` from that registry to a
``dir:``; measured ``skopeo copy`` of the same image through a fresh node (cold: the node
builds it -- fetches, verifies, stores, commits -- while it streams the blobs to skopeo).
Medians; goal: ratio <= 1.1x. Also a warm pull (cache hit) through the same node, and
the CPU seconds skopeo and the node used in each (on a busy machine the wall-clock ratio
follows the CPU the node adds). ``--upstream-rate`` puts the upstream behind a link of that
rate (a proxy shared by the direct and the node's pulls), as on the internet.
Prints ``cold_pull_ratio_<MIB>x<LAYERS>=<ratio>`` per image (and ``cold_pull_ratio=`` for
the first image, as before).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    MIB,
    Copy,
    Image,
    RateLimitedProxy,
    median_ratio,
    parse_rate,
    push_image,
    timed_copy,
)
from support.node import NodeProcess
from support.registry import UpstreamRegistry

GOAL = 1.1


def parse_image(text: str) -> tuple[int, int]:
    mib, _, layers = text.partition("x")
    return int(mib), int(layers or 1)


def bench_image(upstream: str, image: Image, work: Path, runs: int,
                log_level: str) -> float:
    """``upstream``: ``http://127.0.0.1:PORT`` of the registry (or of a capped link to it)."""
    direct: list[Copy] = []
    cold: list[Copy] = []
    warm: list[Copy] = []
    upstream_src = f"docker://{upstream.removeprefix('http://')}/{image.reference}"
    for run in range(runs):
        with NodeProcess(work / f"node{run}", upstream=upstream,
                         extra=("--log-level", log_level)) as node:
            assert node.proc is not None
            src = f"docker://127.0.0.1:{node.port}/{image.reference}"
            pids = (node.proc.pid,)
            if run % 2 == 0:
                direct.append(timed_copy(upstream_src, work / "d"))
                cold.append(timed_copy(src, work / "c", watch=pids))
            else:
                cold.append(timed_copy(src, work / "c", watch=pids))
                direct.append(timed_copy(upstream_src, work / "d"))
            warm.append(timed_copy(src, work / "w", watch=pids))
        shutil.rmtree(work / f"node{run}", ignore_errors=True)
    d, c, ratio = median_ratio([x.seconds for x in direct], [x.seconds for x in cold])
    w = statistics.median(x.seconds for x in warm)
    mib = image.total_bytes / MIB
    name = f"{round(mib)}x{len(image.layer_digests)}"
    print(f"image {image.reference}: {len(image.layer_digests)} layer(s), {mib:.0f} MiB; "
          f"median of {runs} runs (baseline and measured interleaved)")
    print(f"  skopeo copy from upstream (baseline) {d:6.2f} s  "
          f"[{', '.join(f'{x.seconds:.2f}' for x in direct)}]")
    print(f"  cold pull through a fresh node       {c:6.2f} s  "
          f"[{', '.join(f'{x.seconds:.2f}' for x in cold)}]  ratio {ratio:.2f}x (goal <= "
          f"{GOAL}x: {'met' if ratio <= GOAL else 'NOT met'})")
    print(f"  warm pull through the node (cache)   {w:6.2f} s  ratio {w / d:.2f}x")
    print(f"  CPU seconds (medians): skopeo direct {_cpu(direct)}; cold: node "
          f"{_cpu(cold, 0)} + skopeo {_cpu(cold)}; warm: node {_cpu(warm, 0)} + skopeo "
          f"{_cpu(warm)}")
    print(f"cold_pull_ratio_{name}={ratio:.3f}", flush=True)
    return ratio


def _cpu(copies: list[Copy], server: int | None = None) -> str:
    values = [x.client_cpu if server is None else x.server_cpu[server] for x in copies]
    return f"{statistics.median(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", action="append", metavar="MIBxLAYERS",
                        help="image size and layer count (repeatable; default 100x3 and 1024x1)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--log-level", default="info", help="the nodes' --log-level")
    parser.add_argument("--upstream-rate", metavar="RATE",
                        help="cap the upstream link (e.g. 50MB/s; both the direct and the "
                             "node's pulls go through it); default: loopback, uncapped")
    args = parser.parse_args()
    images = [parse_image(t) for t in (args.image or ["100x3", "1024x1"])]
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-pull-"))
    try:
        with UpstreamRegistry(work / "upstream") as reg, contextlib.ExitStack() as stack:
            upstream = reg.url
            if args.upstream_rate:
                rate = parse_rate(args.upstream_rate)
                upstream = stack.enter_context(RateLimitedProxy(reg.port, rate)).url
                print(f"upstream link capped at {rate / 1e6:.0f} MB/s")
            first: float | None = None
            for mib, layers in images:
                image = push_image(reg.url, f"library/big{mib}x{layers}", "1.0", layers=layers,
                                   total_bytes=mib * MIB, work=work / "push",
                                   seed=f"bench-pull-{mib}x{layers}")
                ratio = bench_image(upstream, image, work, args.runs, args.log_level)
                first = ratio if first is None else first
            if first is not None:
                print(f"cold_pull_ratio={first:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
