"""Consensus among 4 build-node processes on 127.0.0.1 (issue: consensus).

    python bench/bench_consensus.py [--builds 10]

Four nodes, three of them authorized by the first (each authorization is itself a
block committed by the build nodes in force). Then ``--builds`` images are built one
after another on a build node, and the node's own log reports, for each, the time
from the end of its build (artifacts fetched, verified, stored; records signed) to
the commit of the block holding them: propose, every other validator rebuilding the
image from its own upstream and comparing hashes, prevotes, precommits with the
checkpoint signatures. Then the same builds are requested all at once (queued), and
committed records per second are reported. Baseline: the same builds on a network of
one build node (no consensus), measured in the same run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.images import ImageSpec, seed_images
from support.node import NodeProcess, run_cli
from support.registry import UpstreamRegistry

FAST = ("--sync-interval", "0.5")
LATENCY = re.compile(
    r"^(\S+ \S+) .*Consensus latency: (\d+) record\(s\) of (\S+) committed in block \d+ "
    r"([\d.]+) ms", re.M)
VOUCHED = re.compile(r"^(\S+ \S+) .*Rebuilt and vouched for \d+ pending record\(s\) of (\S+)$",
                     re.M)


def stamp(text: str) -> float:
    """Log timestamp (``2026-11-28 06:34:00,981``) -> seconds."""
    import datetime

    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def status(n: NodeProcess) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{n.url}/api/status", timeout=120).json()  # type: ignore[no-any-return]


def build_and_wait(home: Path, node: NodeProcess, image: str) -> None:
    out = run_cli(home, "build", "docker", "--image", image, port=node.port, timeout=120)
    assert out.returncode == 0, out.stderr
    build_id = out.stdout.split("ID ")[1].split()[0]
    deadline = time.monotonic() + 120
    while "SUCCESS" not in run_cli(home, "build", "status", "--id", build_id,
                                   port=node.port).stdout:
        assert time.monotonic() < deadline, node.log()[-2000:]
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--builds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-consensus-"))
    specs = tuple(ImageSpec(f"library/img{i}", "1.0", "v2s2", seed=f"bench-{i}")
                  for i in range(2 * args.builds))
    nodes: list[NodeProcess] = []
    try:
        with UpstreamRegistry(work / "up") as reg:
            seed_images(reg, specs, workdir=work / "seed")
            a = NodeProcess(work / "a", upstream=reg.url, extra=FAST).start()
            nodes.append(a)
            for name in "bcd":
                nodes.append(NodeProcess(work / name, upstream=reg.url,
                                         extra=(*FAST, "--peer", a.url)).start())
            for peer in nodes[1:]:
                out = run_cli(work, "authorize", "--peer", status(peer)["node_id"],
                              "--data-dir", str(a.data_dir), port=a.port, timeout=120)
                assert out.returncode == 0, out.stderr
            # Sequential builds: latency from build end to commit.
            for i in range(args.builds):
                build_and_wait(work, nodes[1], f"img{i}:1.0")
            builder_log = nodes[1].log()
            latencies = [float(ms) for _, _, _, ms in LATENCY.findall(builder_log)]
            # From the last validator's rebuild result (its vouch) to the commit.
            vouches: dict[str, float] = {}
            for n in nodes:
                for ts, package in VOUCHED.findall(n.log()):
                    vouches[package] = max(vouches.get(package, 0.0), stamp(ts))
            after_last = [
                (stamp(ts) - vouches[package]) * 1000
                for ts, _, package, _ in LATENCY.findall(builder_log) if package in vouches
            ]
            # Queued builds: records per second.
            t = time.perf_counter()
            before = status(a)["log_records"]
            ids = []
            for i in range(args.builds, 2 * args.builds):
                out = run_cli(work, "build", "docker", "--image", f"img{i}:1.0",
                              port=nodes[1 + i % 3].port)
                ids.append(out.returncode)
            while status(a)["log_records"] < before + 4 * args.builds:
                time.sleep(0.05)
            queued = time.perf_counter() - t
            records = status(a)["log_records"] - before
        print(f"4 build nodes, {args.builds} sequential builds: commit latency after the build "
              f"median {statistics.median(latencies):.0f} ms, min {min(latencies):.0f} ms, max "
              f"{max(latencies):.0f} ms (goal < 100 ms median)")
        if after_last:
            print(f"   from the last validator's rebuild result to the commit: median "
                  f"{statistics.median(after_last):.0f} ms, max {max(after_last):.0f} ms")
        print(f"{args.builds} builds queued on 3 build nodes at once: {records} records committed "
              f"in {queued:.2f} s = {records / queued:.0f} records/s (goal >= 1,000/s batched)")
        print(f"consensus_latency_ms={statistics.median(latencies):.1f}")
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
