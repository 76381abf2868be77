"""``/metrics``: the node's Prometheus metrics (text format, ``prometheus_client``).

Each node has a registry of its own (several nodes in one process never clash) holding one
collector that reads everything at scrape time: the counters of ``node.activity`` and the
node's state (ledger, consensus, peers, builds, store). Nothing is updated per request here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._activity import LATENCY_BUCKETS
from ._asgi import Receive, Scope, Send, send_bytes, send_json
from ._node import MAX_RUNNING_BUILDS

__all__ = ["METRICS_PATH", "NodeCollector", "metrics"]

METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeCollector(Collector):
    """The metrics of one node, computed when scraped (see the module docstring)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.store: tuple[int, int] = (0, 0)  # (bytes used, artifacts), read before a scrape

    def collect(self) -> Iterator[Metric]:
        node, act = self.node, self.node.activity
        ledger = node.log_store.ledger

        info = GaugeMetricFamily("pyrsia_node_info", "The node (value 1) and its network.",
                                 labels=["node_id", "network_origin", "role"])
        info.add_metric([node.node_id, ledger.origin,
                         "build node" if node.is_build_node else "mirror"], 1)
        yield info

        requests = CounterMetricFamily(
            "pyrsia_pulls", "Requests to package mounts (/v2, /maven2...) answered, by mount, "
            "method, status class and where the artifact came from.",
            labels=["mount", "method", "status", "source"])
        for (mount, method, status, source), n in sorted(act.requests.items()):
            requests.add_metric([mount, method, status, source], n)
        yield requests

        hist = HistogramMetricFamily(
            "pyrsia_pull_duration_seconds", "Time to answer a request to a package mount.",
            labels=["mount"])
        for mount, (counts, total, _n) in sorted(act.latency.items()):
            buckets, running = [], 0
            for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                running += count
                buckets.append((bound, running))
            hist.add_metric([mount], buckets, total)
        yield hist

        served = CounterMetricFamily(
            "pyrsia_served_bytes", "Body bytes of pull responses, by where the artifact came "
            "from (cache, peer, upstream, build).", labels=["source"])
        for source, n in sorted(act.served_bytes.items()):
            served.add_metric([source], n)
        yield served

        fetched = CounterMetricFamily(
            "pyrsia_fetched_bytes", "Bytes of verified artifacts fetched to answer pulls, by "
            "source (peer, upstream).", labels=["source"])
        for source, n in sorted(act.fetched_bytes.items()):
            fetched.add_metric([source], n)
        yield fetched

        failures = CounterMetricFamily(
            "pyrsia_verification_failures", "Verification failures by reason: bytes that did "
            "not match their digest, peers that misbehaved, damaged stored copies.",
            labels=["reason"])
        for reason, n in sorted(act.verification_failures.items()):
            failures.add_metric([reason], n)
        yield failures

        yield GaugeMetricFamily("pyrsia_ledger_height", "Height of the node's ledger.",
                                value=ledger.height)
        yield GaugeMetricFamily("pyrsia_ledger_records", "Records in the transparency log.",
                                value=ledger.tree.size)
        yield GaugeMetricFamily("pyrsia_build_nodes", "Authorized build nodes.",
                                value=len(list(ledger.validators.ordered())))

        height, round_, heard_heights = (
            node.consensus.progress() if node.consensus is not None else (None, 0, {}))
        yield GaugeMetricFamily(
            "pyrsia_consensus_height", "The height the build nodes are deciding now (0: none).",
            value=height or 0)
        yield GaugeMetricFamily(
            "pyrsia_consensus_round", "The round of the height being decided (0 when idle).",
            value=round_)
        heard = GaugeMetricFamily(
            "pyrsia_consensus_heard_height", "The highest consensus height each other build "
            "node sent a message for.", labels=["node_id"])
        for nid, h in sorted(heard_heights.items()):
            heard.add_metric([nid], h)
        yield heard

        peers = node.peers
        yield GaugeMetricFamily("pyrsia_peers", "Peers in the routing table.",
                                value=len(peers.table) if peers is not None else 0)
        received = CounterMetricFamily("pyrsia_peer_received_bytes",
                                       "Blob bytes received from peers.")
        received.add_metric([], sum(st.bytes_in for st in peers.stats.values())
                            if peers is not None else 0)
        yield received
        yield CounterMetricFamily("pyrsia_peer_upload_bytes",
                                  "Bytes of blob responses this node opened for peers.",
                                  value=act.upload_bytes)
        yield CounterMetricFamily("pyrsia_upload_waits", "Uploads to peers that waited for "
                                  "the upload-rate limit.", value=act.upload_waits)
        yield CounterMetricFamily("pyrsia_upload_wait_seconds", "Seconds uploads to peers "
                                  "waited for the upload-rate limit.",
                                  value=act.upload_wait_seconds)

        builds = GaugeMetricFamily("pyrsia_builds", "Builds this node knows, by state "
                                   "(QUEUED, RUNNING, WAITING_FOR_QUORUM, SUCCESS, FAILED).",
                                   labels=["state"])
        for state, n in sorted(build_states(node).items()):
            builds.add_metric([state], n)
        yield builds

        used, artifacts = self.store
        yield GaugeMetricFamily("pyrsia_store_bytes", "Bytes of artifacts stored.", value=used)
        yield GaugeMetricFamily("pyrsia_store_quota_bytes", "The disk quota for artifacts.",
                                value=node.disk_space)
        yield GaugeMetricFamily("pyrsia_store_artifacts", "Artifacts stored.", value=artifacts)
        yield CounterMetricFamily("pyrsia_evictions", "Blobs evicted to stay within the quota.",
                                  value=act.evictions)
        yield CounterMetricFamily("pyrsia_evicted_bytes", "Bytes evicted to stay within the "
                                  "quota.", value=act.evicted_bytes)


def build_states(node: Any) -> dict[str, int]:
    """Builds by state; running builds beyond the free build slots are QUEUED."""
    states: dict[str, int] = {"QUEUED": 0, "RUNNING": 0, "WAITING_FOR_QUORUM": 0,
                              "SUCCESS": 0, "FAILED": 0}
    for build in node.builds.values():
        states[build.status] = states.get(build.status, 0) + 1
    queued = max(0, states["RUNNING"] - running_slots(node))
    states["QUEUED"], states["RUNNING"] = queued, states["RUNNING"] - queued
    return states


def running_slots(node: Any) -> int:
    """Builds holding a build slot now."""
    return max(0, MAX_RUNNING_BUILDS - int(node.build_slots.value))


def registry_for(node: Any) -> tuple[CollectorRegistry, NodeCollector]:
    """The node's own registry (made on first use, kept on its activity)."""
    act = node.activity
    reg = act.registry
    if reg is None:
        reg = CollectorRegistry(auto_describe=False)
        collector = NodeCollector(node)
        reg.register(collector)
        act.registry, act.collector = reg, collector
    return reg, act.collector


async def metrics(node: Any, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer ``GET /metrics`` (and HEAD) with the node's metrics."""
    head = scope["method"] == "HEAD"
    if scope["method"] not in ("GET", "HEAD"):
        await send_json(send, 405, {"error": f"{scope['method']} is not supported"},
                        [("allow", "GET, HEAD")], head=head)
        return
    reg, collector = registry_for(node)
    collector.store = (await node.blobs.usage(), await node.blobs.count())
    await send_bytes(send, 200, generate_latest(reg), [("cache-control", "no-store")],
                     content_type=CONTENT_TYPE, head=head)
