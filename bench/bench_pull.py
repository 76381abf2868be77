"""Cold pull through a node vs skopeo straight from the upstream (issue: the node).

    python bench/bench_pull.py [--mib 100] [--layers 3] [--runs 3]

An image of ``--layers`` layers totalling ``--mib`` MiB is pushed to a local
Debian ``docker-registry``. Baseline: ``skopeo copy`` from that registry to a
``dir:``. Measured: ``skopeo copy`` of the same image through a fresh node (cold:
the node builds it -- fetches, verifies, stores, commits -- and serves it). Goal:
ratio <= 1.3x. Also a warm pull (cache hit) through the node.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.clients import skopeo
from support.images import make_image_layout, push
from support.node import NodeProcess
from support.registry import UpstreamRegistry


def timed_copy(src: str, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    t = time.perf_counter()
    skopeo("copy", "--src-tls-verify=false", src, f"dir:{dest}", timeout=600)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-pull-"))
    try:
        with UpstreamRegistry(work / "upstream") as reg:
            layout = make_image_layout(
                work / "layout", seed="bench", layers=args.layers,
                layer_size=args.mib * 1024 * 1024 // args.layers, tag="1.0",
            )
            push(layout, reg, "library/big", "1.0", format="v2s2", src_tag="1.0")
            direct, cold, warm = [], [], []
            for run in range(args.runs):
                direct.append(timed_copy(f"docker://{reg.host}/library/big:1.0", work / "d"))
                with NodeProcess(work / f"node{run}", upstream=reg.url) as node:
                    src = f"docker://127.0.0.1:{node.port}/library/big:1.0"
                    cold.append(timed_copy(src, work / "c"))
                    warm.append(timed_copy(src, work / "w"))
            d, c, w = (statistics.median(x) for x in (direct, cold, warm))
            print(f"image: {args.layers} layers, {args.mib} MiB; median of {args.runs} runs")
            print(f"skopeo copy from upstream (baseline) {d:6.2f} s")
            print(f"cold pull through a node             {c:6.2f} s   ratio {c / d:.2f}x "
                  f"(goal <= 1.3x)")
            print(f"warm pull through a node (cache hit) {w:6.2f} s   ratio {w / d:.2f}x")
            print(f"cold_pull_ratio={c / d:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
