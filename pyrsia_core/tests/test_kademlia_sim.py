"""Deterministic simulation of whole Kademlia networks (issue 4, "Tests that count").

1,000 nodes join (each through one random earlier node, looking up its own id), then
200 lookups for random keys are checked against the brute-force k closest live nodes,
and 200 provider records are published and looked up, with 0 %, 10 % and 30 % of the
nodes crashed. The 10,000-node run takes longer than this suite's budget (about 20 s
to build on one core); it is in ``bench/sim_kademlia.py``.
"""

from __future__ import annotations

import math

import pytest
from pyrsia_core.kademlia import SimNetwork, SimReport

N = 1000
LOOKUPS = 200
SEED = 4


@pytest.fixture(scope="module")
def network() -> SimNetwork:
    sim = SimNetwork(N, SEED)
    sim.bootstrap()
    return sim


def scenario(network: SimNetwork, crashed: float) -> SimReport:
    sim = network.fork()
    sim.crash(crashed)
    return sim.run(LOOKUPS)


def test_bootstrap_builds_sound_routing_tables(network: SimNetwork) -> None:
    assert network.joined == N
    for node in network.nodes:
        table = node.table
        assert len(table) > 0
        assert all(len(table.bucket(i)) <= network.k for i in range(256))
        assert table.pending_pings == []  # every ping was answered and reported
    # Every node is known to someone (nobody joined unseen).
    known = {c.node_id for node in network.nodes for c in node.table.contacts()}
    assert len(known) == N


def test_no_crashes_lookups_find_exactly_the_k_closest(network: SimNetwork) -> None:
    report = scenario(network, 0.0)
    assert report.crashed == 0
    assert report.exact >= 0.99, report
    assert report.mean_hops <= math.log2(N) / 2 + 2, report
    assert report.mean_failures == 0
    assert report.providers_found >= 0.99, report


def test_ten_percent_crashed_providers_are_found(network: SimNetwork) -> None:
    report = scenario(network, 0.10)
    assert report.crashed == N // 10
    assert report.providers_found >= 0.95, report
    assert report.mean_failures > 0  # the crashed nodes were really in the way


def test_thirty_percent_crashed_providers_are_found(network: SimNetwork) -> None:
    sim = network.fork()
    sim.crash(0.30)

    def dead_entries() -> int:
        dead = {n.contact.node_id for n in sim.nodes if not n.alive}
        return sum(c.node_id in dead for n in sim.nodes if n.alive for c in n.table.contacts())

    before = dead_entries()
    report = sim.run(LOOKUPS)
    assert report.providers_found >= 0.90, report
    # Timeouts and failed pings evict crashed contacts: the tables heal as they are used.
    assert dead_entries() < before


def test_simulation_is_deterministic() -> None:
    reports = []
    for _ in range(2):
        sim = SimNetwork(300, 11)
        sim.bootstrap()
        sim.crash(0.2)
        reports.append(sim.run(40))
    assert reports[0] == reports[1]
    other = SimNetwork(300, 12)
    other.bootstrap()
    other.crash(0.2)
    assert other.run(40) != reports[0]


def test_fork_leaves_the_original_untouched(network: SimNetwork) -> None:
    before = [len(n.table) for n in network.nodes]
    scenario(network, 0.3)
    assert all(n.alive for n in network.nodes)
    assert [len(n.table) for n in network.nodes] == before


def test_simulation_rejects_bad_arguments() -> None:
    for args in ((0, 1), (10, 1, 0), (10, 1, 20, 0)):
        with pytest.raises(ValueError):
            SimNetwork(*args)
    with pytest.raises(ValueError):
        SimNetwork(10, 1, latency=(0.5, 2.0), timeout=1.0)
    sim = SimNetwork(10, 1)
    with pytest.raises(ValueError):
        sim.crash(1.0)
    with pytest.raises(ValueError):
        sim.run(-1)
