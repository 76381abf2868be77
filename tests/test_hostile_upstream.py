"""A build node against a hostile upstream: huge indexes, lying sizes, slow drips, floods of
unknown images, shared layers, images of too many artifacts. Real node processes on
127.0.0.1; the upstream is :class:`support.hostile.HostileUpstream`, scripted per test.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.hostile import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    Handler,
    HostileUpstream,
    digest_of,
    image_manifest,
    wait_for,
)
from support.node import NodeProcess, wait_until

pytestmark = pytest.mark.process


@pytest.fixture
def upstream() -> Iterator[HostileUpstream]:
    with HostileUpstream() as up:
        yield up


def _rss_peak_kb(node: NodeProcess) -> int:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _status(node: NodeProcess) -> dict[str, Any]:
    return node.get("/api/status").json()  # type: ignore[no-any-return]


def _build(node: NodeProcess, image: str, timeout: float = 60) -> dict[str, Any]:
    """Ask for a build through the node API and wait until it ends; its final status."""
    resp = httpx.post(f"{node.url}/api/build/docker", json={"image": image}, timeout=30)
    assert resp.status_code == 202, resp.text
    build_id = resp.json()["build_id"]
    deadline = time.monotonic() + timeout
    while True:
        status = node.get(f"/api/builds/{build_id}").json()
        if status["status"] != "RUNNING":
            return status  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"build of {image} never ended"
        time.sleep(0.1)


def _error(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    return body["errors"][0]  # type: ignore[no-any-return]


# -- 2: an index of huge manifests ---------------------------------------------------------


def test_huge_index_is_bounded_in_bytes_and_memory(
    tmp_path: Path, upstream: HostileUpstream
) -> None:
    """60 platform manifests of ~4 MB each: the build stops at the manifests' byte budget,
    having fetched a few of them, and the node's peak memory barely moves."""
    config = b'{"architecture":"amd64","os":"linux"}'
    layer = b"layer"
    subs = []
    for i in range(60):
        body = image_manifest(config, [(digest_of(layer), len(layer))],
                              annotations={"pad": "x" * 4_000_000 + str(i)})
        digest = upstream.manifest("evil/huge", None, body)
        subs.append({"mediaType": DOCKER_MANIFEST, "size": len(body), "digest": digest,
                     "platform": {"architecture": "amd64", "os": "linux", "variant": str(i)}})
        del body
    index = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST,
                        "manifests": subs}).encode()
    upstream.manifest("evil/huge", "1", index, DOCKER_LIST)
    with NodeProcess(tmp_path / "n", upstream=upstream.url) as node:
        before = _rss_peak_kb(node)
        resp = node.get("/v2/evil/huge/manifests/1")
        assert resp.status_code in (502, 503), resp.text
        assert "too large" in _error(resp)["message"]
        fetched = upstream.count(prefix="/v2/evil/huge/manifests/sha256:")
        assert 1 <= fetched <= 5, fetched  # 16 MB of manifests at most, not 240 MB
        grown_mb = (_rss_peak_kb(node) - before) / 1024
        assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB"
        assert _status(node)["artifact_count"] == 0  # nothing of the failed build stays
        assert "Traceback" not in node.log()


# -- 3 and 11.5: the disk quota --------------------------------------------------------------


def _fill(node: NodeProcess, upstream: HostileUpstream, n: int, size: int) -> None:
    for i in range(n):
        layer = random.Random(f"fill{i}").randbytes(size)
        upstream.image(f"fill/img{i}", "1", [layer])
        assert _build(node, f"fill/img{i}:1")["status"] == "SUCCESS"


def test_lying_layer_size_evicts_nothing(tmp_path: Path, upstream: HostileUpstream) -> None:
    """A manifest declares a 380 KB layer and the upstream sends 1 KiB: the build fails
    and the cache keeps what it held (room is made for bytes that arrive, not promised)."""
    with NodeProcess(tmp_path / "n", upstream=upstream.url,
                     extra=("--disk-space", "400 KB")) as node:
        _fill(node, upstream, 6, 48_000)
        held = _status(node)["disk_usage"]
        assert held > 280_000
        claimed = random.Random("liar").randbytes(380_000)
        config = b'{"architecture":"amd64","os":"linux","liar":1}'
        upstream.blob("evil/liar", config)

        def short(h: Handler) -> None:
            h.send_body(200, claimed[:1024], "application/octet-stream")

        upstream.route(f"/v2/evil/liar/blobs/{digest_of(claimed)}", short)
        upstream.manifest("evil/liar", "1", image_manifest(
            config, [(digest_of(claimed), len(claimed))]))
        result = _build(node, "evil/liar:1")
        assert result["status"] == "FAILED"
        after = _status(node)["disk_usage"]
        assert after >= held - 1024, (held, after)
        assert "Evicted" not in node.log()


def test_image_over_the_quota_is_refused_on_the_manifest(
    tmp_path: Path, upstream: HostileUpstream
) -> None:
    """An image larger than the whole quota: the manifest request itself says so (507 DENIED,
    naming the quota), instead of a 200 followed by blobs that are never there."""
    layers = [random.Random(f"big{i}").randbytes(150_000) for i in range(3)]
    upstream.image("evil/big", "1", layers)
    with NodeProcess(tmp_path / "n", upstream=upstream.url,
                     extra=("--disk-space", "400 KB")) as node:
        resp = node.get("/v2/evil/big/manifests/1")
        assert resp.status_code == 507, resp.text
        err = _error(resp)
        assert err["code"] == "DENIED"
        assert "quota" in err["message"] and "400000" in err["message"]
        assert upstream.count(prefix="/v2/evil/big/blobs/") == 0
        # A fitting image is still built and served.
        small = random.Random("small").randbytes(10_000)
        upstream.image("ok/small", "1", [small])
        assert node.get("/v2/ok/small/manifests/1").status_code == 200
        resp = node.get(f"/v2/ok/small/blobs/{digest_of(small)}")
        assert resp.status_code == 200 and resp.content == small


# -- 14: slow upstream transfers; status never waits ----------------------------------------


def test_slow_drip_fails_the_transfer_and_status_does_not_wait(
    tmp_path: Path, upstream: HostileUpstream
) -> None:
    layer = random.Random("drip").randbytes(100_000)
    config = b'{"architecture":"amd64","os":"linux","drip":1}'
    upstream.blob("evil/drip", config)

    def drip(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(layer)))
        h.end_headers()
        for i in range(120):  # 1 byte every 0.5 s, for at most a minute
            if upstream.stopping.is_set():
                return
            h.wfile.write(layer[i:i + 1])
            h.wfile.flush()
            upstream.sleep(0.5)

    upstream.route(f"/v2/evil/drip/blobs/{digest_of(layer)}", drip)
    upstream.manifest("evil/drip", "1", image_manifest(config, [(digest_of(layer), len(layer))]))
    options = ("--upstream-option", "min_rate=2000", "--upstream-option", "rate_window=3",
               "--upstream-option", "idle_timeout=4")
    with NodeProcess(tmp_path / "n", upstream=upstream.url, extra=options) as node:
        started = time.monotonic()
        assert node.get("/v2/evil/drip/manifests/1").status_code == 200  # the build runs
        t0 = time.monotonic()
        status = node.get("/api/status")
        assert status.status_code == 200
        assert time.monotonic() - t0 < 1.0, "status waited for the running build"
        resp = node.get(f"/v2/evil/drip/blobs/{digest_of(layer)}")
        assert resp.status_code == 404  # the build failed: nothing of it is vouched for
        assert "too slow" in resp.text  # the client is told why (while the node logs it)
        assert time.monotonic() - started < 15
        wait_until("the node to log why", lambda: "too slow" in node.log(), timeout=5)


# -- 10: floods of unknown images -------------------------------------------------------------


def test_unknown_tag_single_flight_and_negative_cache(
    tmp_path: Path, upstream: HostileUpstream
) -> None:
    with NodeProcess(tmp_path / "n", upstream=upstream.url) as node:
        path = "/v2/evil/missing/manifests/1"

        def pull(_: int) -> int:
            return httpx.get(node.url + path, timeout=60).status_code

        with ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(pull, range(300)))
        assert set(statuses) == {404}
        for _ in range(20):  # within the negative cache's lifetime: no upstream request
            assert pull(0) == 404
        assert upstream.count(path) <= 2, upstream.count(path)


def test_build_queue_is_bounded(tmp_path: Path, upstream: HostileUpstream) -> None:
    """100 distinct unknown images at once, each answered slowly upstream: the node queues a
    bounded number of builds and refuses the rest at once with 429 TOOMANYREQUESTS."""
    def slow_404(h: Handler) -> None:
        upstream.sleep(1.0)
        h.send_body(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}',
                    "application/json")

    for i in range(100):
        upstream.route(f"/v2/evil/slow{i}/manifests/1", slow_404)
    with NodeProcess(tmp_path / "n", upstream=upstream.url) as node:

        def pull(i: int) -> tuple[int, str]:
            r = httpx.get(f"{node.url}/v2/evil/slow{i}/manifests/1", timeout=90)
            return r.status_code, _error(r)["code"]

        with ThreadPoolExecutor(100) as pool:
            results = list(pool.map(pull, range(100)))
        refused = [r for r in results if r[0] == 429]
        assert refused and all(code == "TOOMANYREQUESTS" for _, code in refused)
        assert {s for s, _ in results} <= {404, 429}
        # Only the queued builds asked the upstream; the refused ones cost it nothing.
        assert len(refused) >= 10, len(refused)
        assert upstream.count(prefix="/v2/evil/slow") == len(results) - len(refused)
        assert node.get("/v2/").status_code == 200


# -- 15: shared digests across repositories; artifacts per image ------------------------------


def test_concurrent_builds_sharing_a_layer_serve_both_repositories(
    tmp_path: Path, upstream: HostileUpstream
) -> None:
    shared = random.Random("shared").randbytes(20_000)
    for repo in ("team/a", "team/b"):
        upstream.image(repo, "1", [shared])
        upstream.blob(repo, shared, delay=2.0)  # slow: both builds are still running below
    with NodeProcess(tmp_path / "n", upstream=upstream.url) as node:
        assert node.get("/v2/team/a/manifests/1").status_code == 200
        assert node.get("/v2/team/b/manifests/1").status_code == 200
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(
                lambda repo: node.get(f"/v2/{repo}/blobs/{digest_of(shared)}"),
                ["team/a", "team/b"]))
        for resp in got:
            assert resp.status_code == 200, resp.text
            assert resp.content == shared


def test_image_with_too_many_artifacts_fails_clearly(
    tmp_path: Path, upstream: HostileUpstream
) -> None:
    layers = [f"layer {i}".encode() for i in range(1001)]
    upstream.image("evil/many", "1", layers)
    with NodeProcess(tmp_path / "n", upstream=upstream.url) as node:
        before = _status(node)["log_records"]
        result = _build(node, "evil/many:1", timeout=120)
        assert result["status"] == "FAILED"
        assert "too many artifacts" in result["reason"]
        assert _status(node)["log_records"] == before
        assert upstream.count(prefix="/v2/evil/many/blobs/") == 0
        assert wait_for(lambda: _status(node)["artifact_count"] == 0, 10)
