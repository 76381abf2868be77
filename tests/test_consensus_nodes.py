"""Authorized build nodes reaching consensus, as real node processes (issue: consensus)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.clients import skopeo
from support.fixtures import SeededUpstream
from support.node import NodeProcess, node_status, run_cli, wait_until

status = node_status

pytestmark = pytest.mark.process
FAST = ("--sync-interval", "0.5")


def authorize(home: Path, admin: NodeProcess, peer: NodeProcess, *, force: bool = False) -> None:
    """``pyrsia authorize`` the peer; ``force`` while the network is too small to keep a
    quorum without it (growing from one build node to three)."""
    out = run_cli(home, "authorize", "--peer", status(peer)["node_id"], "--data-dir",
                  str(admin.data_dir), *(["--force"] if force else []), port=admin.port,
                  timeout=120)
    assert out.returncode == 0, out.stderr + admin.log()[-3000:]
    assert "authorized build node" in out.stdout


@contextlib.contextmanager
def build_nodes(base: Path, upstream: str, *, extra: tuple[str, ...] = (),
                names: str = "abcd") -> Iterator[list[NodeProcess]]:
    """One node per name under ``base``, the others peers of the first, all authorized build
    nodes (each knows them all); stopped on exit. ``extra``: further ``node start`` flags."""
    nodes: list[NodeProcess] = []
    try:
        a = NodeProcess(base / names[0], upstream=upstream, extra=(*FAST, *extra)).start()
        nodes.append(a)
        for name in names[1:]:
            nodes.append(NodeProcess(base / name, upstream=upstream,
                                     extra=(*FAST, *extra, "--peer", a.url)).start())
        for i, peer in enumerate(nodes[1:]):
            authorize(base, a, peer, force=i < 2)
        ids = {status(n)["node_id"] for n in nodes}
        for n in nodes:
            wait_until(f"{n.url} to list {len(nodes)} build nodes",
                       lambda n=n: set(status(n)["authorized_build_nodes"]) == ids)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture
def four(tmp_path: Path, fresh_seeded_upstream: SeededUpstream) -> Iterator[list[NodeProcess]]:
    with build_nodes(tmp_path, fresh_seeded_upstream.url) as nodes:
        yield nodes


def test_unauthorized_caller_is_refused(tmp_path: Path, seeded_upstream: SeededUpstream) -> None:
    with NodeProcess(tmp_path / "a", upstream=seeded_upstream.url, extra=FAST) as a, \
            NodeProcess(tmp_path / "b", upstream=None, extra=(*FAST, "--peer", a.url)) as b:
        wait_until("b to be known", lambda: len(status(a)["peers"]) >= 1)
        out = run_cli(tmp_path, "authorize", "--peer", status(b)["node_id"], "--token", "wrong",
                      port=a.port)
        assert out.returncode != 0 and "401" in out.stderr and "token" in out.stderr
        r = httpx.post(f"{a.url}/api/authorize", json={"peer": status(b)["node_id"]})
        assert r.status_code == 401
        assert status(a)["authorized_build_nodes"] == [status(a)["node_id"]]


def test_four_build_nodes_commit_with_one_down(
    four: list[NodeProcess], tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    a, b, c, d = four
    d.stop()
    # A build requested on B (a build node) commits with 3 of 4 build nodes.
    out = run_cli(tmp_path, "build", "docker", "--image", "alpine:3.16.2", port=b.port)
    assert out.returncode == 0, out.stderr
    build_id = out.stdout.split("ID ")[1].split()[0]
    wait_until("the build to succeed", lambda: "SUCCESS" in run_cli(
        tmp_path, "build", "status", "--id", build_id, port=b.port).stdout, timeout=90)
    records = json.loads(run_cli(tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2",
                                 "--proof", port=c.port).stdout)
    assert len(records) == 4
    checkpoint = records[0]["proof"]["checkpoint"]
    # The certificate carries signatures of at least 3 of the 4 build nodes.
    assert checkpoint.count("\u2014 ") >= 3
    again = run_cli(tmp_path, "build", "docker", "--image", "alpine:3.16.2", port=a.port)
    assert again.returncode != 0 and "Artifact already exists" in again.stderr
    got = skopeo("copy", "--src-tls-verify=false",
                 f"docker://127.0.0.1:{c.port}/library/alpine:3.16.2", f"dir:{tmp_path / 'x'}")
    assert got.returncode == 0


def test_two_down_nothing_commits_until_they_return(
    four: list[NodeProcess], tmp_path: Path
) -> None:
    a, _b, c, d = four
    height = status(a)["ledger_height"]
    c.stop()
    d.stop()
    out = run_cli(tmp_path, "build", "docker", "--image", "library/ociimage:1.0", port=a.port)
    assert out.returncode == 0, out.stderr
    build_id = out.stdout.split("ID ")[1].split()[0]
    time.sleep(5)
    assert status(a)["ledger_height"] == height  # 2 of 4 is no quorum: nothing commits
    assert "SUCCESS" not in run_cli(tmp_path, "build", "status", "--id", build_id,
                                    port=a.port).stdout
    c.start()
    wait_until("the build to commit once a quorum is back",
               lambda: status(a)["ledger_height"] > height, timeout=90)
    wait_until("c to catch up", lambda: status(c)["ledger_height"] == status(a)["ledger_height"])


def test_regular_node_requests_a_build_and_then_pulls(
    four: list[NodeProcess], tmp_path: Path
) -> None:
    a = four[0]
    with NodeProcess(tmp_path / "r", upstream=None, extra=(*FAST, "--peer", a.url)) as r:
        wait_until("r to sync", lambda: status(r)["ledger_height"] == status(a)["ledger_height"])
        first = httpx.get(f"{r.url}/v2/library/multi/manifests/1.0", timeout=30)
        assert first.status_code == 404
        assert "requested" in first.json()["errors"][0]["message"]
        wait_until("the records to reach the regular node", lambda: run_cli(
            tmp_path, "inspect-log", "docker", "--image", "multi:1.0", port=r.port
        ).returncode == 0, timeout=90)
        skopeo("copy", "--all", "--src-tls-verify=false",
               f"docker://127.0.0.1:{r.port}/library/multi:1.0", f"dir:{tmp_path / 'm'}")


def test_a_tampering_build_node_never_gets_its_hashes_committed(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    from support.images import ImageSpec, seed_images
    from support.registry import UpstreamRegistry

    honest_url = fresh_seeded_upstream.url
    honest_digest = fresh_seeded_upstream.images["library/alpine:3.16.2"].manifest_digest
    with UpstreamRegistry(tmp_path / "evil-upstream") as evil_upstream:
        # Same name, different bytes: what a compromised builder would see.
        seed_images(evil_upstream, (ImageSpec("library/alpine", "3.16.2", "v2s2",
                                              seed="tampered"),), workdir=tmp_path / "evil")
        nodes: list[NodeProcess] = []
        try:
            a = NodeProcess(tmp_path / "a", upstream=honest_url, extra=FAST).start()
            nodes.append(a)
            for name in "bc":
                nodes.append(NodeProcess(tmp_path / name, upstream=honest_url,
                                         extra=(*FAST, "--peer", a.url)).start())
            evil = NodeProcess(tmp_path / "evil", upstream=evil_upstream.url,
                               extra=(*FAST, "--peer", a.url)).start()
            nodes.append(evil)
            for i, peer in enumerate(nodes[1:]):
                authorize(tmp_path, a, peer, force=i < 2)
            # The tampering node builds first: its records never commit.
            height = status(a)["ledger_height"]
            out = run_cli(tmp_path, "build", "docker", "--image", "alpine:3.16.2",
                          port=evil.port)
            assert out.returncode == 0, out.stderr
            time.sleep(6)
            assert status(a)["ledger_height"] == height
            # An honest build of the same image commits, with the honest hashes.
            out = run_cli(tmp_path, "build", "docker", "--image", "alpine:3.16.2",
                          port=nodes[1].port)
            assert out.returncode == 0, out.stderr
            wait_until("the honest build to commit",
                       lambda: status(a)["ledger_height"] > height, timeout=90)
            records = json.loads(run_cli(tmp_path, "inspect-log", "docker", "--image",
                                         "alpine:3.16.2", port=a.port).stdout)
            assert records[0]["artifact_hash"] == honest_digest.removeprefix("sha256:")
            assert {r["node_id"] for r in records} == {status(nodes[1])["node_id"]}
            assert "DIFFERENT hashes" in evil.log()
        finally:
            for n in nodes:
                n.stop()


def test_builds_queued_at_once_each_commit_once_on_every_node(
    four: list[NodeProcess], fresh_seeded_upstream: SeededUpstream, tmp_path: Path
) -> None:
    """Every seeded image requested at once from three build nodes: proposals then hold
    what one quorum rebuilt, batch while more rebuilds are on their way, and builds pause
    while heights are decided -- and still every record commits exactly once, in the same
    blocks on every node."""
    a, b, c, d = four
    before = status(a)["log_records"]
    images = sorted(fresh_seeded_upstream.images)
    builds: list[tuple[NodeProcess, str]] = []
    with httpx.Client(timeout=60) as http:
        for i, image in enumerate(images):
            node = (b, c, d)[i % 3]
            r = http.post(f"{node.url}/api/build/docker", json={"image": image})
            assert r.status_code == 202, r.text
            builds.append((node, r.json()["build_id"]))
        for node, build_id in builds:
            url = f"{node.url}/api/builds/{build_id}"
            wait_until(f"build {url} to succeed",
                       lambda url=url: http.get(url).json()["status"] == "SUCCESS", timeout=120)
    counts: list[int] = []
    for image in images:
        out = run_cli(tmp_path, "inspect-log", "docker", "--image", image, port=a.port)
        assert out.returncode == 0, out.stderr
        records = json.loads(out.stdout)
        artifacts = [r["package_specific_artifact_id"] for r in records]
        assert len(artifacts) == len(set(artifacts)), f"{image} committed twice: {artifacts}"
        counts.append(len(records))
    assert status(a)["log_records"] == before + sum(counts)
    head = status(a)["ledger_head"]
    for n in (b, c, d):
        wait_until(f"{n.url} to hold the same ledger", lambda n=n: status(n)["ledger_head"] == head)
        assert status(n)["log_records"] == before + sum(counts)
