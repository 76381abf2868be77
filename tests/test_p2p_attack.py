"""Real node processes on 127.0.0.1 against a hostile peer with keys of its own.

The attacker (``support.attack``) holds hundreds of connections open on the node's port,
announces a tarpit as the provider of the images' blobs, gossips far-ahead blocks naming
the tarpit and claims addresses by the hundred; the node keeps serving its clients, pulls
from its honest peer, and contacts the tarpit only within its checking budget. Joined
nodes are listed once (no phantom from the join), and dropped once they are gone.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support.attack import (
    SlowClients,
    Tarpit,
    fake_providers,
    far_ahead_blocks,
    image_digests,
    ping_flood,
    pull,
)
from support.fixtures import SeededUpstream
from support.node import NodeProcess, node_status, wait_until

pytestmark = pytest.mark.process
FAST = ("--sync-interval", "0.5")


def peers_of(node: NodeProcess) -> dict[str, dict[str, object]]:
    return {p["node_id"]: p for p in httpx.get(f"{node.url}/api/peers", timeout=30).json()}


@pytest.fixture
def tarpit() -> Iterator[Tarpit]:
    pit = Tarpit()
    try:
        yield pit
    finally:
        pit.stop()


def in_background(*jobs: Callable[[], object]) -> list[threading.Thread]:
    threads = [threading.Thread(target=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    return threads


def test_pull_stays_fast_under_attack(
    tmp_path: Path, seeded_upstream: SeededUpstream, tarpit: Tarpit
) -> None:
    """500 slow connections + fake providers (1) + far-ahead blocks (4) + claimed addresses
    (5) at once: cached pulls stay fast, an uncached pull from the honest peer completes.

    Before: each of the 20 fake providers cost the full blob timeout (15 s) first, so the
    uncached pull took minutes; the claimed addresses were polled every sync interval."""
    a = NodeProcess(tmp_path / "a", upstream=seeded_upstream.url, extra=FAST)
    v = NodeProcess(tmp_path / "v", extra=(*FAST, "--peer", a.url))
    slow: SlowClients | None = None
    try:
        a.start()
        v.start()
        for ref in (("library/alpine", "3.16.2"), ("library/ociimage", "1.0")):
            pull(a.url, *ref)
        height = node_status(a)["ledger_height"]
        wait_until("the node to sync", lambda: node_status(v)["ledger_height"] >= height)
        pull(v.url, "library/alpine", "3.16.2")  # now cached on v
        calm = [pull(v.url, "library/alpine", "3.16.2") for _ in range(3)]

        slow = SlowClients(v.port, 500).start()
        assert slow.opened >= 450
        digests = image_digests(a.url, "library/ociimage", "1.0")
        attacks = in_background(
            lambda: fake_providers(v.url, digests, tarpit.url, 20),
            lambda: far_ahead_blocks(v.url, tarpit.url, 12),
            lambda: ping_flood(v.url, tarpit.url, 500),
        )
        attacked = [pull(v.url, "library/alpine", "3.16.2", timeout=20) for _ in range(5)]
        for t in attacks:
            t.join(60)
        assert not any(t.is_alive() for t in attacks)
        # Uncached: from the honest peer, past the 20 fake providers announced meanwhile.
        uncached = pull(v.url, "library/ociimage", "1.0", timeout=30)
        assert statistics.median(attacked) < 2.0, (calm, attacked)
        assert uncached < 10, uncached
        # The node still follows its ledger and answers its API.
        assert node_status(v)["ledger_height"] == node_status(a)["ledger_height"]
        assert set(peers_of(v)) == {node_status(a)["node_id"]}
        # The tarpit was contacted only within the checking budget, and is not polled.
        time.sleep(1.0)
        count = tarpit.requests
        time.sleep(2.0)  # four sync intervals
        assert tarpit.requests == count, (count, tarpit.requests)
        assert count <= 200, count
        assert v.proc is not None and v.proc.poll() is None
        assert "Traceback" not in v.log()
    finally:
        if slow is not None:
            slow.stop()
        v.stop()
        a.stop()


def test_claimed_addresses_are_not_polled(tmp_path: Path, tarpit: Tarpit) -> None:
    """500 PINGs from fresh keys claiming the tarpit's address (paths varied): a few checks,
    no peer recorded, nothing polled. Before: 500 entries polled every sync interval."""
    with NodeProcess(tmp_path / "n", extra=FAST) as node:
        replies = ping_flood(node.url, tarpit.url, 500)
        assert replies.count("PONG") == 500
        time.sleep(4.0)  # eight sync intervals; every check has timed out
        count = tarpit.requests
        assert count <= 8, count
        time.sleep(2.0)
        assert tarpit.requests == count
        assert peers_of(node) == {}
        assert node_status(node)["peers_count"] == 0


def test_joined_node_listed_once_and_dropped_when_gone(
    tmp_path: Path, seeded_upstream: SeededUpstream
) -> None:
    """A node joining with --peer is listed once by its peer (no phantom id from asking for
    the genesis) and once gone, it leaves the list; ``last_seen`` stays Unix seconds."""
    a = NodeProcess(tmp_path / "a", upstream=seeded_upstream.url, extra=FAST)
    b = NodeProcess(tmp_path / "b", extra=(*FAST, "--peer", a.url))
    try:
        a.start()
        b.start()
        a_id, b_id = node_status(a)["node_id"], node_status(b)["node_id"]
        wait_until("a to list b", lambda: b_id in peers_of(a), timeout=20)
        time.sleep(1.0)  # a few sync rounds: any phantom would be listed by now
        assert set(peers_of(a)) == {b_id}
        assert set(peers_of(b)) == {a_id}
        entry = peers_of(a)[b_id]
        assert abs(float(json.dumps(entry["last_seen"])) - time.time()) < 30
        assert node_status(a)["peers_count"] == 1
        b.stop()
        wait_until("a to drop b", lambda: peers_of(a) == {}, timeout=30)
        assert node_status(a)["peers_count"] == 0
    finally:
        b.stop()
        a.stop()
