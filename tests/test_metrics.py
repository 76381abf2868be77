"""``/metrics``: a live node process scraped with Prometheus' own parser; a pull moves the
counters it should (real node process, real HTTP)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.fixtures import SeededUpstream
from support.maven import maven_upstream
from support.node import NodeProcess, node_status, run_cli, wait_until
from support.pulls import pull as pull_image
from test_consensus_nodes import FAST, authorize
from test_maven import HELLO_DIR, _node, _repo

pytestmark = pytest.mark.process
IMAGE = "library/alpine:3.16.2"


def scrape(node: NodeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = httpx.get(f"{node.url}/metrics", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def test_metrics_count_pulls_bytes_and_sources(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    upstream = fresh_seeded_upstream
    info = upstream.images[IMAGE]
    with NodeProcess(tmp_path / "a", upstream=upstream.url) as node:
        before = scrape(node)
        assert value(before, "pyrsia_pulls_total") == 0
        assert value(before, "pyrsia_ledger_height") == 0
        assert value(before, "pyrsia_store_bytes") == 0
        assert value(before, "pyrsia_node_info", role="build node") == 1

        first = pull_image(node.url, upstream, IMAGE)
        after = scrape(node)
        requests = 2 + len(info.layer_digests)  # manifest, config, layers
        assert value(after, "pyrsia_pulls_total", mount="/v2", method="GET",
                     status="2xx") == requests
        # The manifest started a build; its blobs were then local.
        assert value(after, "pyrsia_pulls_total", source="build") == 1
        assert value(after, "pyrsia_pulls_total", source="cache") == requests - 1
        assert value(after, "pyrsia_served_bytes_total") == first
        assert value(after, "pyrsia_fetched_bytes_total", source="upstream") > 0
        assert value(after, "pyrsia_pull_duration_seconds_count", mount="/v2") == requests
        assert value(after, "pyrsia_pull_duration_seconds_bucket", mount="/v2",
                     le="+Inf") == requests
        assert value(after, "pyrsia_pull_duration_seconds_sum", mount="/v2") > 0
        assert value(after, "pyrsia_ledger_height") == 1
        assert value(after, "pyrsia_ledger_records") >= requests
        assert value(after, "pyrsia_builds", state="SUCCESS") == 1
        assert value(after, "pyrsia_builds", state="RUNNING") == 0
        assert value(after, "pyrsia_store_bytes") >= first
        assert value(after, "pyrsia_store_artifacts") >= requests
        assert value(after, "pyrsia_verification_failures_total") == 0
        assert value(after, "pyrsia_peers") == 0

        second = pull_image(node.url, upstream, IMAGE)
        again = scrape(node)
        assert second == first
        assert value(again, "pyrsia_pulls_total", source="cache") == 2 * requests - 1
        assert value(again, "pyrsia_pulls_total", source="build") == 1
        assert value(again, "pyrsia_served_bytes_total", source="cache") == (
            value(after, "pyrsia_served_bytes_total", source="cache") + second)
        # Nothing more was fetched: the second pull came from the cache.
        assert value(again, "pyrsia_fetched_bytes_total") == value(
            after, "pyrsia_fetched_bytes_total")
        assert value(again, "pyrsia_ledger_height") == 1
        # An unknown image is counted with its status class.
        assert httpx.get(f"{node.url}/v2/library/nothere/manifests/1",
                         timeout=30).status_code == 404
        assert value(scrape(node), "pyrsia_pulls_total", status="4xx") == 1
        assert httpx.post(f"{node.url}/metrics", timeout=10).status_code == 405


def test_metrics_follow_consensus_heights_and_builds(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    """Two build nodes: with one away, the other's metrics show the height it is deciding
    and its build waiting for the quorum; once it is back, the block commits."""
    upstream = fresh_seeded_upstream.url
    with NodeProcess(tmp_path / "a", upstream=upstream, extra=FAST) as a, \
            NodeProcess(tmp_path / "b", upstream=upstream, extra=(*FAST, "--peer", a.url)) as b:
        authorize(tmp_path, a, b, force=True)
        b_id = node_status(b)["node_id"]
        for n in (a, b):
            wait_until("two build nodes", lambda n=n: len(
                node_status(n)["authorized_build_nodes"]) == 2)
        height = node_status(a)["ledger_height"]
        idle = scrape(a)
        assert value(idle, "pyrsia_build_nodes") == 2
        assert value(idle, "pyrsia_consensus_height") == 0
        assert value(idle, "pyrsia_ledger_height") == height
        assert value(idle, "pyrsia_peers") == 1
        b.stop()
        out = run_cli(tmp_path, "build", "docker", "--image", "alpine:3.16.2", port=a.port)
        assert out.returncode == 0, out.stderr
        wait_until("A deciding the next height", lambda: value(
            scrape(a), "pyrsia_consensus_height") == height + 1, timeout=60)
        wait_until("the build waiting for the quorum", lambda: value(
            scrape(a), "pyrsia_builds", state="WAITING_FOR_QUORUM") == 1, timeout=60)
        assert value(scrape(a), "pyrsia_consensus_round") >= 0
        b.start()
        wait_until("the block to commit", lambda: value(
            scrape(a), "pyrsia_ledger_height") == height + 1, timeout=90)
        wait_until("A idle again", lambda: value(scrape(a), "pyrsia_consensus_height") == 0)
        done = scrape(a)
        assert value(done, "pyrsia_builds", state="SUCCESS") == 1
        assert value(done, "pyrsia_builds", state="WAITING_FOR_QUORUM") == 0
        assert value(done, "pyrsia_consensus_heard_height", node_id=b_id) >= height + 1


@pytest.mark.anyio
async def test_maven_pulls_are_counted_under_their_mount(tmp_path: Path) -> None:
    """A plugin's mount (``/maven2``) is metered too: the first GET of a jar is a build,
    the next ones come from the cache."""
    root = tmp_path / "upstream"
    files = _repo(root)
    jar = f"{HELLO_DIR}/hello-1.0.jar"
    with maven_upstream(root) as upstream:
        async with _node(tmp_path, "a", upstream.url) as running, httpx.AsyncClient(
            base_url=running.url, trust_env=False, timeout=30
        ) as client:
            for _ in range(3):
                resp = await client.get(f"/maven2/{jar}")
                assert resp.content == files[jar]
            samples = {}
            for family in text_string_to_metric_families((await client.get("/metrics")).text):
                for s in family.samples:
                    samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert value(samples, "pyrsia_pulls_total", mount="/maven2", status="2xx") == 3
    assert value(samples, "pyrsia_pulls_total", mount="/maven2", source="build") == 1
    assert value(samples, "pyrsia_pulls_total", mount="/maven2", source="cache") == 2
    assert value(samples, "pyrsia_served_bytes_total") == 3 * len(files[jar])
    assert value(samples, "pyrsia_pull_duration_seconds_count", mount="/maven2") == 3
    assert value(samples, "pyrsia_pulls_total", mount="/v2") == 0
