"""``/metrics``: a live node process scraped with Prometheus' own parser; a pull moves the
counters it should (real node process, real HTTP)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.fixtures import SeededUpstream
from support.node import NodeProcess
from support.pulls import pull as pull_image

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
