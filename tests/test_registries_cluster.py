"""Issue #15 on a cluster: the kubelet's path (containerd's CRI plugin), a regular node serving
both registries' images from its peers while the upstreams are down, and four build nodes
agreeing on a ghcr.io image.

The three share one module-scoped set-up: two real ``docker-registry`` upstreams playing
"docker.io" and "ghcr.io", four authorized build nodes mirroring both, and one containerd
whose CRI plugin reads the ``hosts.toml`` files of its ``config_path`` (each ``server`` a
closed local port, so nothing leaves the machine). Each test pulls or builds images of its
own, so they pass in any order, or alone.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.cri import CriImageService
from support.fixtures import SeededUpstream
from support.images import ImageSpec, seed_images
from support.net import free_port
from support.node import NodeProcess, node_status, run_cli, wait_until
from support.registry import UpstreamRegistry
from test_consensus_nodes import FAST, build_nodes
from test_setup import Containerd, _ctr_digest, _setup

pytestmark = pytest.mark.process

HUB_IMAGES = (
    ImageSpec("library/alpine", "3.16.2", "v2s2", seed="alpine-3.16.2"),
    ImageSpec("library/busybox", "1.36", "oci", seed="hub-busybox-1.36"),
)
GHCR_IMAGES = (
    ImageSpec("library/alpine", "3.16.2", "v2s2", seed="ghcr-alpine-3.16.2"),
    ImageSpec("org/app", "1.0", "oci", seed="ghcr-org-app-1.0"),
    ImageSpec("org/tool", "2.0", "v2s2", seed="ghcr-org-tool-2.0"),
)


@pytest.fixture(scope="module")
def upstreams(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SeededUpstream, SeededUpstream]]:
    """Docker Hub's and ghcr.io's stand-ins; the same names hold different content."""
    base = tmp_path_factory.mktemp("upstreams")
    with UpstreamRegistry(base / "hub") as hub, UpstreamRegistry(base / "ghcr") as ghcr:
        hub_images = seed_images(hub, HUB_IMAGES, workdir=base / "hub-layouts")
        ghcr_images = seed_images(ghcr, GHCR_IMAGES, workdir=base / "ghcr-layouts")
        yield SeededUpstream(hub, hub_images), SeededUpstream(ghcr, ghcr_images)


@pytest.fixture(scope="module")
def network(
    upstreams: tuple[SeededUpstream, SeededUpstream], tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[NodeProcess]]:
    """Four authorized build nodes, each with both upstreams."""
    hub, ghcr = upstreams
    with build_nodes(tmp_path_factory.mktemp("network"), hub.url,
                     extra=("--upstream", f"ghcr.io={ghcr.url}")) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def cri() -> Iterator[tuple[Containerd, Path]]:
    """A containerd with its CRI plugin, and the plugin's ``config_path`` (empty)."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.fail("containerd is not installed (.ci/setup.sh installs it)")
    base = Path(tempfile.mkdtemp(prefix="pyrsia-cri-"))  # socket paths: 108 bytes at most
    certs = base / "certs.d"
    certs.mkdir()
    daemon = Containerd(base / "d", cri_config_path=certs).start()
    try:
        yield daemon, certs
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)


def _point_at(node: NodeProcess, certs: Path, home: Path) -> None:
    """``pyrsia setup containerd`` for docker.io, and its copy for ghcr.io (README)."""
    closed = f"http://127.0.0.1:{free_port()}"  # the fallback: nothing leaves the machine
    out = _setup(home, "containerd", "--node", f"127.0.0.1:{node.port}", "--config-dir",
                 str(certs), "--fallback", closed)
    assert out.returncode == 0, out.stderr
    (certs / "ghcr.io").mkdir(exist_ok=True)
    (certs / "ghcr.io" / "hosts.toml").write_text((certs / "docker.io" / "hosts.toml").read_text())


def test_the_kubelet_pulls_each_registry_through_the_node(
    upstreams: tuple[SeededUpstream, SeededUpstream], network: list[NodeProcess],
    cri: tuple[Containerd, Path], tmp_path: Path,
) -> None:
    """CRI ``PullImage``, as the kubelet calls it, with the ``hosts.toml`` that setup wrote in
    the CRI plugin's ``config_path``: each image is built by the build nodes from its own
    registry and reaches containerd through the node, with the upstream's digests."""
    hub, ghcr = upstreams
    node = network[0]
    daemon, certs = cri
    _point_at(node, certs, tmp_path)
    with CriImageService(daemon.socket) as images:
        for registry, upstream in (("docker.io", hub), ("ghcr.io", ghcr)):
            image = f"{registry}/library/alpine:3.16.2"
            want = upstream["library/alpine:3.16.2"]
            mark, log_mark = upstream.registry.mark(), len(node.log())
            # containerd answers with the image id: the config's digest.
            assert images.pull(image) == want.config_digest
            got = images.status(image)
            assert got is not None and got.id == want.config_digest
            assert image in got.repo_tags
            assert got.repo_digests == (f"{registry}/library/alpine@{want.manifest_digest}",)
            served = node.log()[log_mark:]
            assert f"Manifest {want.manifest_digest} of " in served, served[-3000:]
            for blob in want.blob_digests:
                assert f"Blob {blob} of " in served, (blob, served[-3000:])
            # The node (the only client of the upstreams here) built it from its registry.
            assert upstream.registry.manifest_fetches_since(mark)
        assert hub["library/alpine:3.16.2"].manifest_digest != ghcr[
            "library/alpine:3.16.2"].manifest_digest
        # The kubelet pulls a removed image again: the node serves it from its cache.
        image, want = "docker.io/library/alpine:3.16.2", hub["library/alpine:3.16.2"]
        images.remove(image)
        assert images.status(image) is None
        log_mark = len(node.log())
        assert images.pull(image) == want.config_digest
        lines = [line for line in node.log()[log_mark:].splitlines()
                 if " of library/alpine" in line]
        assert any(want.manifest_digest in line for line in lines), lines
        assert all("served from cache" in line for line in lines), lines


def _records(node: NodeProcess, image: str) -> list[dict[str, Any]] | None:
    """The node's log records of ``image`` (what ``pyrsia inspect-log`` prints), if any."""
    resp = httpx.get(f"{node.url}/api/inspect-log/docker", params={"image": image}, timeout=30)
    if resp.status_code == 404:
        return None
    resp.raise_for_status()
    records: list[dict[str, Any]] = resp.json()
    return records


def _build(nodes_and_images: list[tuple[NodeProcess, str]]) -> None:
    """Request the builds at once (``pyrsia build``'s API), and wait until each succeeded."""
    with httpx.Client(timeout=60) as http:
        urls = []
        for node, image in nodes_and_images:
            resp = http.post(f"{node.url}/api/build/docker", json={"image": image})
            assert resp.status_code == 202, resp.text
            urls.append(f"{node.url}/api/builds/{resp.json()['build_id']}")
        for url in urls:
            wait_until(f"build {url} to succeed",
                       lambda url=url: http.get(url).json()["status"] == "SUCCESS", timeout=90)


def test_four_build_nodes_commit_a_ghcr_io_image(
    upstreams: tuple[SeededUpstream, SeededUpstream], network: list[NodeProcess], tmp_path: Path,
) -> None:
    """Every build node rebuilds ``ghcr.io/org/app:1.0`` from its ghcr.io upstream (Docker Hub
    has no ``org/app``: a node rebuilding from there would vote it down), and all four commit
    the same records, ids in the ``ghcr.io/org/app:1.0`` form."""
    hub, ghcr = upstreams
    want = ghcr["org/app:1.0"]
    image = "ghcr.io/org/app:1.0"
    ghcr_mark, hub_mark = ghcr.registry.mark(), hub.registry.mark()
    out = run_cli(tmp_path, "build", "docker", "--image", image, "--wait", "90",
                  port=network[1].port, timeout=120)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    for n in network:
        wait_until(f"{n.url} to hold the records", lambda n=n: _records(n, image) is not None)
    logs = [_records(n, image) for n in network]
    assert all(log == logs[0] for log in logs[1:]), logs
    shown = run_cli(tmp_path, "inspect-log", "docker", "--image", image, "--proof",
                    port=network[3].port)
    assert shown.returncode == 0, shown.stderr
    records = json.loads(shown.stdout)
    proofs = [r.pop("proof") for r in records]
    assert records == logs[0]
    assert {r["package_specific_id"] for r in records} == {image}
    ids = {r["package_specific_artifact_id"] for r in records}
    assert ids == {image, *(f"ghcr.io/org/app@{d}" for d in want.artifact_digests)}, ids
    hashes = {r["artifact_hash"] for r in records}
    assert {d.removeprefix("sha256:") for d in want.artifact_digests} <= hashes
    assert {r["node_id"] for r in records} == {node_status(network[1])["node_id"]}
    # The block's checkpoint carries the signatures of a quorum (3 of 4).
    assert proofs[0]["checkpoint"].count("\u2014 ") >= 3, proofs[0]["checkpoint"]
    fetches = [e for e in ghcr.registry.access_log(ghcr_mark)
               if e.path == "/v2/org/app/manifests/1.0" and e.status == 200]
    assert len(fetches) >= 3, fetches  # the builder and at least two validators
    assert not [r for r in hub.registry.requests_since(hub_mark) if "org/app" in r[1]]


def test_a_regular_node_serves_both_registries_from_peers_with_the_upstreams_down(
    upstreams: tuple[SeededUpstream, SeededUpstream], network: list[NodeProcess],
    cri: tuple[Containerd, Path], tmp_path: Path,
) -> None:
    """Node A (a build node) builds one image of each registry; then both upstreams stop, and
    containerd (``ctr --hosts-dir``) pulls both through regular node B, which has them from
    its peers only, verified, with the upstream's digests."""
    hub, ghcr = upstreams
    a = network[0]
    daemon, _ = cri
    wanted = {"docker.io/library/busybox:1.36": hub["library/busybox:1.36"],
              "ghcr.io/org/tool:2.0": ghcr["org/tool:2.0"]}
    with NodeProcess(tmp_path / "b", upstream=hub.url,
                     extra=(*FAST, "--upstream", f"ghcr.io={ghcr.url}", "--peer", a.url)) as b:
        _build([(a, "busybox:1.36"), (a, "ghcr.io/org/tool:2.0")])
        wait_until("b to hold a's ledger", lambda: node_status(b)["ledger_head"] == node_status(
            a)["ledger_head"])
        certs = tmp_path / "certs.d"
        _point_at(b, certs, tmp_path)
        pull = ["images", "pull", "--hosts-dir", str(certs), "--snapshotter", "native"]
        hub.registry.stop()
        ghcr.registry.stop()
        try:
            for image, want in wanted.items():
                daemon.ctr(*pull, image)
                assert _ctr_digest(daemon, image) == want.manifest_digest
        finally:
            hub.registry.start()
            ghcr.registry.start()
        log = b.log()
    builders = {node_status(n)["node_id"] for n in network}
    for repo, want in (("library/busybox", wanted["docker.io/library/busybox:1.36"]),
                       ("ghcr.io/org/tool", wanted["ghcr.io/org/tool:2.0"])):
        for blob in want.blob_digests:
            found = re.search(rf"Blob {blob} of {re.escape(repo)} pulled from peer "
                              r"([0-9a-f, ]+), verified", log)
            assert found, (repo, blob, log[-4000:])
            assert set(found[1].split(", ")) <= builders, found[0]
