"""First pull on a regular node whose blobs a peer holds, vs a pull from that peer's cache
(issue #14).

    python bench/bench_peer_pull.py [--runs 3] [--mib 512] [--layers 3]

An image of ``--layers`` layers totalling ``--mib`` MiB is pushed to a local Debian
``docker-registry``. Node A, a build node (a network of one) with that registry as its
upstream, builds it (one ``skopeo copy`` through A). Then, interleaved run by run (the
order swapped every run):

* baseline: ``skopeo copy`` of the image through A (warm: A's cache);
* measured: ``skopeo copy`` through a fresh regular node B started with ``--peer A`` and
  no upstream, once B has synced A's ledger and knows A: B fetches every blob from A,
  verifies it against the log and streams it to skopeo as it arrives.

Medians; goal: ratio <= 1.15x. Prints ``peer_pull_ratio=<ratio>``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MIB, Copy, height, median_ratio, push_image, timed_copy, wait_for
from support.node import NodeProcess
from support.registry import UpstreamRegistry

GOAL = 1.15
FAST = ("--sync-interval", "0.5")
PEER_LINE = re.compile(r"Blob (sha256:[0-9a-f]{64}) pulled from peer")
SWARM_LINE = re.compile(r"pulled from peers in (\d+) verified parts .*?, ([\d.]+) s \(first part "
                        r"after ([\d.]+) s, all parts after ([\d.]+) s\)")


def ready(node: NodeProcess, target: int) -> bool:
    """Has ``node`` synced the ledger up to ``target`` and does it know a peer?"""
    status = httpx.get(f"{node.url}/api/status", timeout=60).json()
    return int(status["ledger_height"]) >= target and int(status["peers_count"]) >= 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--log-level", default="info", help="the nodes' --log-level")
    args = parser.parse_args()
    log = ("--log-level", args.log_level)
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-peer-pull-"))
    try:
        with UpstreamRegistry(work / "upstream") as reg:
            image = push_image(reg.url, "library/big", "1.0", layers=args.layers,
                               total_bytes=args.mib * MIB, work=work / "push",
                               seed=f"bench-peer-pull-{args.mib}x{args.layers}")
            with NodeProcess(work / "a", upstream=reg.url, extra=(*FAST, *log)) as a:
                built = timed_copy(f"docker://127.0.0.1:{a.port}/{image.reference}",
                                   work / "built").seconds
                assert a.proc is not None
                a_pid = a.proc.pid
                target = height(a)
                layers: list[tuple[str, ...]] = []
                from_a: list[Copy] = []
                via_b: list[Copy] = []
                for run in range(args.runs):
                    with NodeProcess(work / f"b{run}", upstream=None,
                                     extra=(*FAST, *log, "--peer", a.url)) as b:
                        wait_for("B to sync A's ledger and know A", partial(ready, b, target))
                        src_a = f"docker://127.0.0.1:{a.port}/{image.reference}"
                        src_b = f"docker://127.0.0.1:{b.port}/{image.reference}"
                        assert b.proc is not None
                        pids = (a_pid, b.proc.pid)
                        if run % 2 == 0:
                            from_a.append(timed_copy(src_a, work / "a-copy", watch=pids))
                            via_b.append(timed_copy(src_b, work / "b-copy", watch=pids))
                        else:
                            via_b.append(timed_copy(src_b, work / "b-copy", watch=pids))
                            from_a.append(timed_copy(src_a, work / "a-copy", watch=pids))
                        missing = set(image.blob_digests) - set(PEER_LINE.findall(b.log()))
                        if missing:
                            raise SystemExit(f"B did not fetch {sorted(missing)} from A:\n"
                                             f"{b.log()[-3000:]}")
                        layers = SWARM_LINE.findall(b.log())
                    shutil.rmtree(work / f"b{run}", ignore_errors=True)
        base, measured, ratio = median_ratio([x.seconds for x in from_a],
                                             [x.seconds for x in via_b])
        mib = image.total_bytes / MIB
        print(f"image: {args.layers} layer(s), {mib:.0f} MiB; built once through A in "
              f"{built:.2f} s; median of {args.runs} runs (interleaved)")
        print(f"  skopeo copy through A, its cache (baseline) {base:6.2f} s  "
              f"[{', '.join(f'{x.seconds:.2f}' for x in from_a)}]")
        print(f"  first pull through a fresh B, from peer A    {measured:6.2f} s  "
              f"[{', '.join(f'{x.seconds:.2f}' for x in via_b)}]  ratio {ratio:.2f}x "
              f"(goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'})")
        def cpu(copies: list[Copy], which: int | None = None) -> str:
            values = [x.client_cpu if which is None else x.server_cpu[which] for x in copies]
            return f"{statistics.median(values):.2f}"

        print(f"  CPU seconds (medians): from A: A {cpu(from_a, 0)} + skopeo {cpu(from_a)}; "
              f"via B: A {cpu(via_b, 0)} + B {cpu(via_b, 1)} + skopeo {cpu(via_b)}")
        print("  B's last run, per layer (parts: whole fetch, all parts in): " + "; ".join(
            f"{p}: {t} s, {a_} s" for p, t, _, a_ in layers))
        print(f"peer_pull_ratio={ratio:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
