"""What the node counts for ``/metrics`` and the status page, on real nodes in process
(pyrsia_core's in-memory network): a lying peer is blamed for a digest mismatch, peers'
bytes are counted, uploads that waited for the rate limit and evictions are counted, and
each node has a Prometheus registry of its own."""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pyrsia_core._ratelimit import TokenBucket
from pyrsia_registry._metrics import metrics
from pyrsia_registry._p2p import PeerStats
from pyrsia_registry._statuspage import activity_json
from test_p2p_faults import BLOB, DIGEST, Net, net  # noqa: F401  (net is a fixture)

from pyrsia_core import Digest
from pyrsia_registry import Node

pytestmark = pytest.mark.anyio


async def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics`` of ``node``'s app, parsed by Prometheus' parser."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    await metrics(node, {"type": "http", "method": "GET", "path": "/metrics"}, receive, send)
    assert sent[0]["status"] == 200
    out = {}
    for family in text_string_to_metric_families(sent[1]["body"].decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


async def test_lying_peer_is_blamed_for_a_digest_mismatch(net: Net) -> None:  # noqa: F811
    stats = net.victim.peers.stats
    stats[net.evil.node_id] = PeerStats("memory://evil", throughput=1e12)
    stats[net.honest.node_id] = PeerStats("memory://honest", throughput=1e3)
    net.memory.faults("memory://evil").corrupt_at = 123_456
    before = await scrape(net.victim)
    assert value(before, "pyrsia_verification_failures_total") == 0
    await net.victim.peers.fetch(DIGEST)
    failures = list(net.victim.activity.failures)
    assert [f["reason"] for f in failures] == ["digest_mismatch"]
    assert failures[0]["blamed"] == f"peer {net.evil.node_id}"
    assert str(DIGEST) in failures[0]["detail"]
    after = await scrape(net.victim)
    assert value(after, "pyrsia_verification_failures_total", reason="digest_mismatch") == 1
    # The honest peer sent the whole blob (the liar's bytes were thrown away).
    assert stats[net.honest.node_id].bytes_in == len(BLOB)
    assert value(after, "pyrsia_peer_received_bytes_total") >= len(BLOB)
    page = await activity_json(net.victim)
    assert page["failures"][0]["reason"] == "digest_mismatch"
    shown = {p["node_id"]: p for p in page["peers"]}
    assert shown[net.honest.node_id]["bytes_in"] == len(BLOB)
    assert shown[net.honest.node_id]["transport"] == "memory"
    assert value(await scrape(net.honest), "pyrsia_peer_upload_bytes_total") == len(BLOB)


async def test_upload_rate_waits_and_evictions_are_counted(net: Net) -> None:  # noqa: F811
    net.victim.peers.stats[net.evil.node_id] = PeerStats("memory://evil", throughput=1e3)
    net.victim.peers.stats[net.honest.node_id] = PeerStats("memory://honest", throughput=1e12)
    net.memory.faults("memory://evil").down = True
    # 4 MB/s with a small burst: the 1 MB blob waits for the bucket at least once.
    net.honest.peers.bucket = TokenBucket(rate=4e6, burst=256 * 1024)
    await net.victim.peers.fetch(DIGEST)
    honest = await scrape(net.honest)
    assert net.honest.activity.upload_waits >= 1
    assert value(honest, "pyrsia_upload_waits_total") == net.honest.activity.upload_waits
    assert value(honest, "pyrsia_upload_wait_seconds_total") > 0

    victim = net.victim
    await victim.set_disk_space(len(BLOB) + 100)
    assert value(await scrape(victim), "pyrsia_evictions_total") == 0
    small = random.Random(3).randbytes(1000)
    await victim.put_bytes(small, Digest.of(small))
    after = await scrape(victim)
    assert value(after, "pyrsia_evictions_total") == 1
    assert value(after, "pyrsia_evicted_bytes_total") == len(BLOB)
    assert value(after, "pyrsia_store_bytes") == len(small)
    assert value(after, "pyrsia_store_quota_bytes") == len(BLOB) + 100


async def test_each_node_has_its_own_registry(net: Net) -> None:  # noqa: F811
    a, b = await scrape(net.victim), await scrape(net.honest)
    assert value(a, "pyrsia_node_info", node_id=net.victim.node_id) == 1
    assert value(a, "pyrsia_node_info", node_id=net.honest.node_id) == 0
    assert value(b, "pyrsia_node_info", node_id=net.honest.node_id) == 1
    assert net.victim.activity.registry is not net.honest.activity.registry
    assert value(a, "pyrsia_peers") == len(net.victim.peers.table) == 3  # build, evil, honest
