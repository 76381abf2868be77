"""Kademlia network simulation (issue 4): lookups and provider records at scale.

    python bench/sim_kademlia.py [--nodes 1000 10000] [--lookups 200] [--seed 1]
                                 [--crashed 0 0.1 0.3]

For each network size the nodes join once (each through one random earlier node,
looking up its own id; in batches of 10 % of the nodes already joined), then, for each
crashed fraction, a fork of that network loses that fraction of its nodes and runs
``--lookups`` lookups for random keys from random live nodes plus as many provider
records (published with ``ADD_PROVIDER`` to the k closest nodes found by a lookup,
then fetched with ``GET_PROVIDERS`` from another random live node). Everything runs on
the real core machines (``RoutingTable``, ``Lookup``, ``ProviderStore``) over an
in-memory network with a seeded scheduler: per-message latency uniform in 10-100 ms,
queries to crashed nodes time out after 1 s. The figures are deterministic for a seed;
only the wall-clock columns vary.

Columns: *exact* is the fraction of lookups whose result is exactly the k = 20
closest live nodes (brute force, the querying node left out); *hops* counts sequential
round trips on a lookup's longest chain (seeds are hop 1), with the issue's goal
log2(n)/2 + 2 for the mean; *queries* and *timeouts* are per lookup; *latency* is
simulated seconds per lookup; *providers* is the fraction of provider lookups that
found the publisher.
"""

from __future__ import annotations

import argparse
import math
import time

from pyrsia_core.kademlia import SimNetwork


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--crashed", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--alpha", type=int, default=3)
    args = parser.parse_args()

    header = (
        f"{'nodes':>6} {'crashed':>7} {'build s':>7} {'run s':>6} {'exact':>6} "
        f"{'hops':>5} {'p99':>4} {'goal':>5} {'queries':>7} {'timeouts':>8} "
        f"{'latency':>7} {'providers':>9} {'p.hops':>6}"
    )
    print(
        f"Kademlia simulation: k={args.k}, alpha={args.alpha}, seed={args.seed}, "
        f"{args.lookups} node lookups + {args.lookups} provider lookups per row"
    )
    print(header)
    print("-" * len(header))
    for n in args.nodes:
        started = time.perf_counter()
        network = SimNetwork(n, args.seed, args.k, args.alpha)
        network.bootstrap()
        build = time.perf_counter() - started
        goal = math.log2(n) / 2 + 2
        for fraction in args.crashed:
            started = time.perf_counter()
            sim = network.fork()
            sim.crash(fraction)
            r = sim.run(args.lookups)
            elapsed = time.perf_counter() - started
            print(
                f"{n:>6} {fraction:>7.0%} {build:>7.1f} {elapsed:>6.1f} {r.exact:>6.1%} "
                f"{r.mean_hops:>5.2f} {r.p99_hops:>4} {goal:>5.2f} {r.mean_queries:>7.1f} "
                f"{r.mean_failures:>8.1f} {r.mean_latency:>7.2f} {r.providers_found:>9.1%} "
                f"{r.provider_mean_hops:>6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
