"""A node against local faults and hostile clients: damaged stored blobs, a lost ledger file,
an empty admin token, cross-site requests and DNS rebinding, absurd Range headers; and the
cache API. Real node processes on 127.0.0.1 (the builds table's bounds are unit-tested).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from support.fixtures import SeededUpstream
from support.net import free_port
from support.node import NodeProcess, run_cli

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = {"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _stored(node: NodeProcess, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    path = node.data_dir / "blobs" / "sha256" / hex_[:2] / hex_
    assert path.exists(), path
    path.chmod(0o644)
    return path


def _wait_committed(node: NodeProcess, image: str) -> None:
    deadline = time.monotonic() + 30
    while node.get("/api/inspect-log/docker", params={"image": image}).status_code != 200:
        assert time.monotonic() < deadline, f"{image} never reached the log"
        time.sleep(0.05)


def _pull(node: NodeProcess, info: Any) -> None:
    resp = node.get("/v2/library/alpine/manifests/3.16.2", headers=ACCEPT)
    assert resp.status_code == 200, resp.text
    _wait_committed(node, "alpine:3.16.2")
    for digest in info.blob_digests:
        resp = node.get(f"/v2/library/alpine/blobs/{digest}")
        assert resp.status_code == 200 and sha256(resp.content) == digest


def _node_start(tmp_path: Path, data_dir: Path, *extra: str) -> Any:
    """``pyrsia node start`` that is expected to refuse to start (bounded in time)."""
    return run_cli(tmp_path, "node", "start", "-H", "127.0.0.1", "-p", str(free_port()),
                   "--data-dir", str(data_dir), "--no-upstream", *extra, timeout=30)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# -- 9: damaged stored blobs ------------------------------------------------------------------


@pytest.mark.process
def test_damaged_blobs_are_never_served_and_are_fetched_again(
    tmp_path: Path, seeded_upstream: SeededUpstream
) -> None:
    info = seeded_upstream.images["library/alpine:3.16.2"]
    config, layer = info.config_digest, info.layer_digests[0]
    node = NodeProcess(tmp_path / "n", upstream=seeded_upstream.url).start()
    try:
        _pull(node, info)
        # Truncated while the node runs: the size check on serving catches it.
        good_config = _stored(node, config).read_bytes()
        _stored(node, config).write_bytes(good_config[:100])
        resp = node.get(f"/v2/library/alpine/blobs/{config}")
        assert resp.status_code == 200 and resp.content == good_config
        assert _stored(node, config).read_bytes() == good_config  # replaced, verified
        assert "quarantined" in node.log()
        # One flipped byte, same size, found after a restart: the first serve hashes it.
        path = _stored(node, layer)
        good_layer = path.read_bytes()
        node.stop()
        bad = bytearray(good_layer)
        bad[len(bad) // 2] ^= 0x01
        path.write_bytes(bytes(bad))
        node = NodeProcess(tmp_path / "n", upstream=seeded_upstream.url).start()
        resp = node.get(f"/v2/library/alpine/blobs/{layer}")
        assert resp.status_code == 200 and resp.content == good_layer
        assert _stored(node, layer).read_bytes() == good_layer
        # Damaged while running, after it was verified: a client's report makes the node
        # hash it again, quarantine it, and serve a good copy next.
        _stored(node, layer).write_bytes(bytes(bad))
        reply = httpx.post(f"{node.url}/api/cache/verify", json={"digest": layer}, timeout=30)
        assert reply.status_code == 200 and reply.json()["stored"] is False, reply.text
        resp = node.get(f"/v2/library/alpine/blobs/{layer}")
        assert resp.status_code == 200 and resp.content == good_layer
        quarantined = node.data_dir / "blobs" / "quarantine" / layer.removeprefix("sha256:")
        assert quarantined.read_bytes() == bytes(bad)
        assert "Traceback" not in node.log()
    finally:
        node.stop()


@pytest.mark.process
def test_startup_scrub_quarantines_damaged_blobs(
    tmp_path: Path, seeded_upstream: SeededUpstream
) -> None:
    info = seeded_upstream.images["library/alpine:3.16.2"]
    with NodeProcess(tmp_path / "n", upstream=seeded_upstream.url) as node:
        _pull(node, info)
    for digest in (info.config_digest, info.layer_digests[0]):
        path = _stored(node, digest)
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    with NodeProcess(tmp_path / "n", upstream=seeded_upstream.url) as node:
        deadline = time.monotonic() + 30
        while "Start-up check of stored blobs" not in node.log():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "2 damaged and quarantined" in node.log()
        for digest in (info.config_digest, info.layer_digests[0]):
            assert not (node.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()
            resp = node.get(f"/v2/library/alpine/blobs/{digest}")
            assert resp.status_code == 200 and sha256(resp.content) == digest


# -- 8: a lost ledger file ------------------------------------------------------------------


@pytest.mark.process
def test_lost_ledger_current_file_refuses_to_start_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with NodeProcess(tmp_path / "n", data_dir=data) as node:
        origin = node.get("/api/status").json()["network_origin"]
    assert origin
    (data / "ledger" / "CURRENT").unlink()
    before = _snapshot(data)
    out = _node_start(tmp_path, data)
    assert out.returncode != 0
    assert "cannot start the node:" in out.stderr and "CURRENT" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "new network" not in out.stderr
    assert _snapshot(data) == before
    # An emptied ledger directory is refused the same way.
    for p in (data / "ledger").iterdir():
        p.unlink()
    before = _snapshot(data)
    out = _node_start(tmp_path, data)
    assert out.returncode != 0 and "cannot start the node:" in out.stderr, out.stderr
    assert _snapshot(data) == before


# -- 7: the admin token ------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("token", ["", "\n", "short"])
def test_empty_or_short_admin_token_refuses_to_start(tmp_path: Path, token: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "admin.token").write_text(token)
    out = _node_start(tmp_path, data)
    assert out.returncode != 0
    assert "cannot start the node:" in out.stderr and "admin token" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert (data / "admin.token").read_text() == token  # left as it was


@pytest.mark.process
def test_empty_bearer_token_is_never_admin(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "n") as node:
        for header in ("Bearer", "bearer"):  # h11 strips what follows an empty token
            for path, body in (("/api/authorize", {"peer": "a" * 64}),
                               ("/api/cache/prune", {"all": True})):
                resp = httpx.post(node.url + path, json=body, headers={"Authorization": header})
                assert resp.status_code == 401, (path, header, resp.text)


# -- 11: cross-site requests and DNS rebinding -------------------------------------------------


@pytest.mark.process
def test_node_api_refuses_cross_site_posts_and_foreign_hosts(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "n", extra=("--allowed-host", "pyrsia.test")) as node:
        port = node.port
        url = f"{node.url}/api/build/docker"
        # A cross-site form or fetch without preflight: text/plain (or no type at all).
        for headers in ({"Content-Type": "text/plain"}, {},
                        {"Content-Type": "application/x-www-form-urlencoded"}):
            resp = httpx.post(url, content=b'{"image": "alpine:3.16.2"}', headers=headers)
            assert resp.status_code == 415, resp.text
            assert "application/json" in resp.json()["error"]
        # A rebinding page's requests carry its own host name.
        for host in ("attacker.invalid", f"attacker.invalid:{port}", f"127.0.0.1.nip.io:{port}",
                     f"pyrsia.test.attacker.invalid:{port}", f"localhost:{port + 1}"):
            resp = httpx.get(f"{node.url}/api/status", headers={"Host": host})
            assert resp.status_code == 421, (host, resp.text)
            assert "error" in resp.json()
            resp = httpx.post(url, json={"image": "alpine:3.16.2"}, headers={"Host": host})
            assert resp.status_code == 421, (host, resp.text)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}",
                     f"[::1]:{port}", "127.0.0.1", "pyrsia.test", f"pyrsia.test:{port}"):
            resp = httpx.get(f"{node.url}/api/status", headers={"Host": host})
            assert resp.status_code == 200, (host, resp.text)
        # Registry clients and peers use whatever name reaches the node.
        assert httpx.get(f"{node.url}/v2/", headers={"Host": "attacker.invalid"}).status_code == 200
        # No CORS headers anywhere, preflight included.
        pre = httpx.options(url, headers={"Origin": "http://attacker.invalid",
                                          "Access-Control-Request-Method": "POST"})
        for resp in (pre, httpx.get(f"{node.url}/api/status",
                                    headers={"Origin": "http://attacker.invalid"})):
            assert not [k for k in resp.headers if k.lower().startswith("access-control-")]
        # The CLI (httpx json=) still works.
        out = run_cli(tmp_path, "status", "--json", port=port)
        assert out.returncode == 0, out.stderr


# -- 12: absurd Range numbers ------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("value", ["bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000,
                                   "bytes=-" + "9" * 5000, "bytes=" + "1" * 20 + "-"])
def test_huge_range_numbers_answer_as_the_reference_registry(
    tmp_path: Path, seeded_upstream: SeededUpstream, value: str
) -> None:
    info = seeded_upstream.images["library/alpine:3.16.2"]
    layer = info.layer_digests[0]
    with NodeProcess(tmp_path / "n", upstream=seeded_upstream.url) as node:
        _pull(node, info)
        ours = node.get(f"/v2/library/alpine/blobs/{layer}", headers={"Range": value})
        # (The reference answers with its own status and a body shorter than the
        # Content-Length it sets: only its status is read.)
        with httpx.stream("GET", f"{seeded_upstream.url}/v2/library/alpine/blobs/{layer}",
                          headers={"Range": value}, timeout=30) as ref:
            assert ours.status_code == ref.status_code, (ours.status_code, ref.status_code)
        assert ours.headers["content-range"] == f"bytes */{len(_stored(node, layer).read_bytes())}"
        assert ours.status_code == 416
        assert "Traceback" not in node.log() and " 500 " not in node.log()


# -- the cache API ---------------------------------------------------------------------------


@pytest.mark.process
def test_cache_list_and_prune(tmp_path: Path, seeded_upstream: SeededUpstream) -> None:
    info = seeded_upstream.images["library/alpine:3.16.2"]
    with NodeProcess(tmp_path / "n", upstream=seeded_upstream.url) as node:
        _pull(node, info)
        listing = node.get("/api/cache").json()
        blobs = {b["digest"]: b for b in listing["blobs"]}
        assert set(info.artifact_digests) <= set(blobs)
        for digest in info.blob_digests:
            entry = blobs[digest]
            assert entry["size"] == len(node.get(f"/v2/library/alpine/blobs/{digest}").content)
            assert isinstance(entry["last_used"], int)
            assert any("alpine" in p for p in entry["packages"])
        assert listing["disk_usage"] == sum(b["size"] for b in listing["blobs"])
        token = (node.data_dir / "admin.token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        prune = f"{node.url}/api/cache/prune"
        assert httpx.post(prune, json={"all": True}).status_code == 401
        assert httpx.post(prune, content=b'{"all": true}',
                          headers={**auth, "Content-Type": "text/plain"}).status_code == 415
        for bad in ({}, {"bytes": -1}, {"bytes": "x"}, {"all": True, "bytes": 1}):
            assert httpx.post(prune, json=bad, headers=auth).status_code == 400, bad
        kept = httpx.post(prune, json={"older_than": 3600}, headers=auth).json()
        assert kept["removed"] == []
        lru = listing["blobs"][0]
        one = httpx.post(prune, json={"bytes": 1}, headers=auth).json()
        assert [r["digest"] for r in one["removed"]] == [lru["digest"]]
        rest = httpx.post(prune, json={"all": True}, headers=auth).json()
        assert len(rest["removed"]) == len(listing["blobs"]) - 1
        assert rest["disk_usage"] == 0 and node.get("/api/cache").json()["blobs"] == []
        # The log still vouches for everything: a pull fetches it again, verified.
        for digest in info.blob_digests:
            resp = node.get(f"/v2/library/alpine/blobs/{digest}")
            assert resp.status_code == 200 and sha256(resp.content) == digest


# -- 10: the builds table (unit) -------------------------------------------------------------


@pytest.mark.anyio
async def test_builds_are_bounded_and_pruned(tmp_path: Path) -> None:
    from pyrsia_registry._node import (
        KEEP_FINISHED_BUILDS,
        MAX_QUEUED_BUILDS,
        MAX_RUNNING_BUILDS,
        BuildQueueFull,
        Node,
    )

    from pyrsia_registry import NodeConfig

    config = NodeConfig(data_dir=tmp_path / "d", upstream=None, kv_store="memory",
                        blob_store="memory")
    node = await Node.open(config)
    try:
        release = anyio.Event()
        running = 0
        most = 0

        async def work(build: Any) -> int:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1
            return 1

        async with anyio.create_task_group() as tg:
            for i in range(MAX_QUEUED_BUILDS):
                node.start_build("Docker", f"x/{i}:1", work, tg)
            with pytest.raises(BuildQueueFull):
                node.start_build("Docker", "x/one-too-many:1", work, tg)
            # Joining a build already queued is not a new build.
            node.start_build("Docker", "x/0:1", work, tg)
            await anyio.sleep(0.1)
            assert most == MAX_RUNNING_BUILDS
            release.set()
        assert most == MAX_RUNNING_BUILDS and not node.inflight

        async def quick(build: Any) -> int:
            return 1

        async with anyio.create_task_group() as tg:
            for i in range(KEEP_FINISHED_BUILDS + 100):
                node.start_build("Docker", f"y/{i}:1", quick, tg)
                await anyio.lowlevel.checkpoint()
        total = len(node.builds)
        assert total == MAX_QUEUED_BUILDS + KEEP_FINISHED_BUILDS + 100  # all young: kept
        assert node.prune_builds(now=time.time() + 3600) == total - KEEP_FINISHED_BUILDS
        kept = list(node.builds.values())
        assert len(kept) == KEEP_FINISHED_BUILDS
        assert kept[-1].package_id == f"y/{KEEP_FINISHED_BUILDS + 99}:1"  # the latest stay
        assert node.prune_builds(now=time.time() + 3600) == 0
    finally:
        await node.aclose()

