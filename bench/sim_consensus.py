"""Tendermint consensus simulation, long run (issue 5): safety and liveness over many seeds.

    python bench/sim_consensus.py [--seeds 10000] [--start 0] [--n 4 7] [--show 10]

Each seed runs the real core machines (``pyrsia_core.consensus.TendermintMachine`` over
real ledgers) in the deterministic simulation of ``pyrsia_core/tests/test_consensus_sim.py``:
a seeded scheduler and simulated clock; messages dropped, delayed, duplicated and
reordered before GST, and pre-GST partitions; honest validators crashing and restarting
from their persisted snapshot; up to f Byzantine validators (equivocating proposals and
votes, double votes, lock-ignoring votes, future-round messages, silence, blocks that fail
the build check, blocks with a wrong root); 2 or 3 heights per run. The seed fixes the
scenario, so any failure replays with ``--start SEED --seeds 1``.

Printed per validator count: seeds run, *violations* (safety: two honest nodes committing
different blocks at a height, a committed block failing the build check or refused by
``Ledger.append``, an honest node signing two messages for one slot; liveness: an honest
node not committing every height, or deciding more than ``liveness_rounds(n)`` = n + 2
rounds after the GST round) -- the goal is 0; *rounds* is the mean deciding round per
height (0 = the first round) and its maximum; *after GST* is how many rounds past the honest nodes'
round at GST a height needed (mean and max); *sim s* the simulated seconds from GST to
every honest node holding every height (mean, max); then restarts from a snapshot,
equivocations caught, and the wall time per seed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pyrsia_core" / "tests"))

from test_consensus_sim import SimResult, liveness_rounds, run_seed


def _row(n: int, results: list[SimResult], wall: float) -> str:
    violations = sum(len(r.violations) for r in results)
    rounds = [r for res in results for r in res.decided_rounds.values()]
    after = [r for res in results for r in res.rounds_after_gst.values()]
    settle = [r.after_gst for r in results if r.after_gst is not None]
    byz = sum(1 for r in results if r.config.byzantine)
    return (
        f"{n:>3} {len(results):>7} {byz:>6} {violations:>10} "
        f"{statistics.fmean(rounds) if rounds else 0:>7.2f} {max(rounds, default=0):>5} "
        f"{statistics.fmean(after) if after else 0:>7.2f} {max(after, default=0):>5} "
        f"{statistics.fmean(settle) if settle else 0:>7.2f} {max(settle, default=0):>7.2f} "
        f"{sum(r.restores for r in results):>8} {sum(r.evidence for r in results):>8} "
        f"{1000 * wall / max(1, len(results)):>8.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10_000, help="seeds per validator count")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--n", type=int, nargs="+", default=[4, 7], help="validator counts")
    parser.add_argument("--show", type=int, default=10, help="violations to print")
    args = parser.parse_args()

    header = (
        f"{'n':>3} {'seeds':>7} {'w/byz':>6} {'violations':>10} {'rounds':>7} {'max':>5} "
        f"{'>GST':>7} {'max':>5} {'sim s':>7} {'max':>7} {'restarts':>8} {'equivoc':>8} "
        f"{'ms/seed':>8}"
    )
    bounds = ", ".join(str(liveness_rounds(n)) for n in args.n)
    print(
        f"Tendermint simulation: seeds {args.start}..{args.start + args.seeds - 1} per n, "
        f"liveness bound n + 2 rounds after GST ({bounds})"
    )
    print(header)
    print("-" * len(header))
    total_runs = total_violations = 0
    shown: list[str] = []
    for n in args.n:
        started = time.perf_counter()
        results = []
        for seed in range(args.start, args.start + args.seeds):
            result = run_seed(seed, n)
            results.append(result)
            shown.extend(result.violations[: max(0, args.show - len(shown))])
        wall = time.perf_counter() - started
        print(_row(n, results, wall), flush=True)
        total_runs += len(results)
        total_violations += sum(len(r.violations) for r in results)
    print(f"\nseeds run: {total_runs}, violations found: {total_violations}")
    for line in shown:
        print("  " + line)
    sys.exit(1 if total_violations else 0)


if __name__ == "__main__":
    main()
