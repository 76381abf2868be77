"""Several real node processes on 127.0.0.1 forming one network (issue: peer-to-peer)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.clients import skopeo
from support.fixtures import SeededUpstream
from support.node import NodeProcess, node_status, run_cli, wait_until

status = node_status

pytestmark = pytest.mark.process
FAST = ("--sync-interval", "0.5")


def copy(node: NodeProcess, image: str, dest: Path) -> set[str]:
    skopeo("copy", "--all", "--src-tls-verify=false", f"docker://127.0.0.1:{node.port}/{image}",
           f"dir:{dest}")
    return {"sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
            for p in dest.iterdir() if p.name != "version"}


@pytest.fixture
def network(tmp_path: Path, fresh_seeded_upstream: SeededUpstream
            ) -> Iterator[list[NodeProcess]]:
    nodes: list[NodeProcess] = []
    try:
        build = NodeProcess(tmp_path / "a", upstream=fresh_seeded_upstream.url, extra=FAST)
        nodes.append(build.start())
        for name in "bcde":
            n = NodeProcess(tmp_path / name, upstream=None, extra=(*FAST, "--peer", build.url))
            nodes.append(n.start())
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def test_five_nodes_share_ledger_and_artifacts(
    network: list[NodeProcess], fresh_seeded_upstream: SeededUpstream, tmp_path: Path
) -> None:
    a, b, c, d, e = network
    genesis = status(a)["ledger_head"]
    for n in network[1:]:
        # Every node joined A's network (same genesis, A is the build node).
        s = status(n)
        assert s["authorized_build_nodes"] == [status(a)["node_id"]]
        assert s["is_build_node"] is False
    assert genesis
    info = fresh_seeded_upstream.images["library/multi:1.0"]
    before = status(a)["ledger_height"]
    got = copy(a, "library/multi:1.0", tmp_path / "via-a")
    assert set(info.artifact_digests) <= got
    # skopeo may be done before the build commits (it never waits for the commit).
    wait_until("A to commit the build", lambda: status(a)["ledger_height"] > before)
    height = status(a)["ledger_height"]
    for n in network[1:]:
        wait_until(f"{n.url} to reach height {height}",
                   lambda n=n: status(n)["ledger_height"] >= height)
        assert status(n)["ledger_head"] == status(a)["ledger_head"]

    # B is not a build node and has no upstream: it fetches every blob from a peer,
    # verified against the log it synced.
    got_b = copy(b, "library/multi:1.0", tmp_path / "via-b")
    assert set(info.artifact_digests) <= got_b
    assert "pulled from peer" in b.log()
    assert status(b)["artifact_count"] >= len(info.artifact_digests)

    # The build node and the upstream go away; C still gets the image, from B.
    a.stop()
    fresh_seeded_upstream.registry.stop()
    time.sleep(0.5)
    got_c = copy(c, "library/multi:1.0", tmp_path / "via-c")
    assert set(info.artifact_digests) <= got_c
    assert "pulled from peer" in c.log()
    b_id = status(b)["node_id"]
    assert b_id[:16] in c.log()

    # pyrsia list / status show the peers.
    peers = json.loads(run_cli(tmp_path, "list", "--json", port=c.port).stdout)
    assert b_id in {p["node_id"] for p in peers}
    table = run_cli(tmp_path, "list", port=c.port).stdout
    assert b_id in table and "ADDRESS" in table
    assert status(c)["peers_count"] >= 2
    assert d.proc is not None and e.proc is not None


def test_late_joiner_catches_up_by_range_requests(
    tmp_path: Path, seeded_upstream: SeededUpstream
) -> None:
    with NodeProcess(tmp_path / "a", upstream=seeded_upstream.url, extra=FAST) as a:
        for image in ("library/alpine:3.16.2", "library/ociimage:1.0", "some/nested/repo:v1"):
            copy(a, image, tmp_path / image.replace("/", "_"))
        height = status(a)["ledger_height"]
        assert height == 3
        with NodeProcess(tmp_path / "late", upstream=None, extra=(*FAST, "--peer", a.url)) as late:
            wait_until("the late node to sync", lambda: status(late)["ledger_height"] == height)
            assert status(late)["log_records"] == status(a)["log_records"]
            out = run_cli(tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2",
                          port=late.port)
            assert len(json.loads(out.stdout)) == 4
            late_port, late_dir = late.port, late.data_dir
        # While the late node is offline, the network moves on; on restart it converges.
        copy(a, "library/ocimulti:1.0", tmp_path / "ocimulti")
        with NodeProcess(tmp_path / "late", port=late_port, data_dir=late_dir, upstream=None,
                         extra=(*FAST, "--peer", a.url)) as late:
            wait_until("the restarted node to converge",
                       lambda: status(late)["ledger_height"] == status(a)["ledger_height"])
