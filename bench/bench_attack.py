"""Client pulls of a cached image on a node under a hostile peer's attack (issue: hardening).

    python bench/bench_attack.py [--connections 500] [--pulls 10]

Two real node processes on 127.0.0.1: a build node A (with a local upstream registry)
and a regular node V that joined it. V caches ``library/alpine:3.16.2``. Measured, in
the same run: a client's pull of that image from V (manifest, config, layers, each
checked against its digest) while nobody attacks, then while an attacker at once

* holds ``--connections`` TCP connections to V's port, each a ``/p2p/rpc`` request whose
  body trickles in a byte a second,
* announces a tarpit as the provider of another image's blobs from 20 fresh keys (1),
* gossips 12 far-ahead blocks naming the tarpit (4),
* claims the tarpit's address in 500 PINGs from fresh keys (5),

each again and again until the attacked pulls are done.

Then one uncached pull from V (its blobs come from A, past the 20 fake providers).
Prints median and p90 of each phase and what the tarpit received. Goal: the attacked
median stays under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.attack import (
    SlowClients,
    Tarpit,
    fake_providers,
    far_ahead_blocks,
    image_digests,
    ping_flood,
    pull,
)
from support.images import seed_images
from support.node import NodeProcess, node_status, wait_until
from support.registry import UpstreamRegistry

FAST = ("--sync-interval", "0.5")
IMAGE = ("library/alpine", "3.16.2")


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--pulls", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-attack-"))
    with UpstreamRegistry(work / "upstream") as reg:
        seed_images(reg, workdir=work / "layouts")
        a = NodeProcess(work / "a", upstream=reg.url, extra=FAST)
        v = NodeProcess(work / "v", extra=(*FAST, "--peer", a.url))
        tarpit = Tarpit()
        slow = None
        try:
            a.start()
            v.start()
            for ref in (IMAGE, ("library/ociimage", "1.0")):
                pull(a.url, *ref)
            height = node_status(a)["ledger_height"]
            wait_until("v to sync", lambda: node_status(v)["ledger_height"] >= height)
            pull(v.url, *IMAGE)  # cached on v from now on
            calm = [pull(v.url, *IMAGE) for _ in range(args.pulls)]

            slow = SlowClients(v.port, args.connections).start()
            digests = image_digests(a.url, "library/ociimage", "1.0")
            done = threading.Event()
            sent = {"providers": 0, "blocks": 0, "pings": 0}

            def repeat(name: str, job: Callable[[], list[str]]) -> None:
                while not done.is_set():  # again and again while the pulls are measured
                    sent[name] += len(job())

            jobs = {
                "providers": lambda: fake_providers(v.url, digests, tarpit.url, 20),
                "blocks": lambda: far_ahead_blocks(v.url, tarpit.url, 12),
                "pings": lambda: ping_flood(v.url, tarpit.url, 500),
            }
            threads = [threading.Thread(target=repeat, args=item, daemon=True)
                       for item in jobs.items()]
            started = time.perf_counter()
            for t in threads:
                t.start()
            time.sleep(1.0)  # the attack is under way
            attacked = [pull(v.url, *IMAGE, timeout=60) for _ in range(args.pulls)]
            done.set()
            for t in threads:
                t.join(120)
            flood_s = time.perf_counter() - started
            uncached = pull(v.url, "library/ociimage", "1.0", timeout=600)
            still_open = slow.open_now
            behind = node_status(a)["ledger_height"] - node_status(v)["ledger_height"]
            peers = node_status(v)["peers_count"]
            time.sleep(3)
            contacted = tarpit.requests
            time.sleep(3)
            polled_after = tarpit.requests - contacted
        finally:
            if slow is not None:
                slow.stop()
            tarpit.stop()
            v.stop()
            a.stop()
    print(f"cached pull of {IMAGE[0]}:{IMAGE[1]} from a regular node, {args.pulls} pulls each")
    print(f"  unattacked  median {statistics.median(calm):6.3f} s  p90 {p90(calm):6.3f} s")
    print(f"  attacked    median {statistics.median(attacked):6.3f} s  p90 {p90(attacked):6.3f} s"
          f"  ({slow.opened if slow else 0} slow connections opened, {still_open} still open)")
    print(f"uncached pull past 20 fake providers: {uncached:6.3f} s")
    print(f"attack frames sent in {flood_s:5.1f} s: {sent}; ledger behind after: {behind}; "
          f"peers listed: {peers}")
    print(f"tarpit: {contacted} requests in all, {polled_after} in the 3 s after")


if __name__ == "__main__":
    main()
