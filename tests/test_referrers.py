"""OCI 1.1 referrers (signatures, SBOMs) through real node processes, a real upstream
(``docker-registry``: distribution 2.8.2, no referrers API, so the tag schema) and skopeo.

The upstream holds ``library/alpine:3.16.2`` with a signature and an SBOM attached: hand-made
OCI manifests with a ``subject``, pushed over HTTP, and the tag-schema index ``sha256-<hex>``
listing them (what oras and cosign push to a registry without the referrers API).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.clients import skopeo
from support.images import (
    STANDARD_IMAGES,
    ImageInfo,
    PlatformImage,
    put_manifest,
    seed_images,
    upload_blob,
)
from support.node import NodeProcess, node_status, run_cli, wait_until
from support.registry import UpstreamRegistry

pytestmark = pytest.mark.process

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
SIG_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM_TYPE = "application/spdx+json"
ZERO = "sha256:" + "0" * 64
FAST = ("--sync-interval", "0.5")
IMAGE = "library/alpine:3.16.2"


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Attached:
    registry: UpstreamRegistry
    image: ImageInfo
    subject: str
    signature: str
    sbom: str
    #: The referrers' own blobs (config, layers).
    blobs: tuple[str, ...]
    #: A platform manifest of ``library/ocimulti:1.0`` (an index) and its signature.
    platform: str
    platform_signature: str


def _referrer(registry: UpstreamRegistry, repo: str, subject: ImageInfo | PlatformImage,
              artifact_type: str,
              payload: bytes, payload_type: str, annotations: dict[str, str],
              *, in_config: bool = False) -> tuple[str, bytes, tuple[str, ...]]:
    """Push a referrer manifest of ``subject`` by digest; (digest, bytes, its blobs)."""
    empty = upload_blob(registry, repo, b"{}")
    layer = upload_blob(registry, repo, payload)
    doc: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": artifact_type if in_config else EMPTY, "digest": empty,
                   "size": 2},
        "layers": [{"mediaType": payload_type, "digest": layer, "size": len(payload)}],
        "subject": {"mediaType": subject.media_type, "digest": subject.manifest_digest,
                    "size": len(subject.manifest)},
        "annotations": annotations,
    }
    if not in_config:
        doc["artifactType"] = artifact_type
    body = _json(doc)
    digest = put_manifest(registry, repo, _digest(body), body, OCI_MANIFEST)
    assert digest == _digest(body)
    return digest, body, (empty, layer)


@pytest.fixture(scope="module")
def attached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attached]:
    base = tmp_path_factory.mktemp("referrers-upstream")
    with UpstreamRegistry(base / "registry") as registry:
        images = seed_images(registry, workdir=base / "layouts")
        image = images[IMAGE]
        repo = image.repo
        sig, sig_body, sig_blobs = _referrer(
            registry, repo, image, SIG_TYPE, b'{"critical":{"type":"cosign container image '
            b'signature"}}', "application/vnd.dev.cosign.simplesigning.v1+json",
            {"dev.cosignproject.cosign/signature": "MEUCIQ-test"})
        # The SBOM's artifact type is its config's media type (the image spec's fallback).
        sbom, sbom_body, sbom_blobs = _referrer(
            registry, repo, image, SBOM_TYPE, b'{"spdxVersion":"SPDX-2.3"}', SBOM_TYPE,
            {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"}, in_config=True)
        index = _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": d, "size": len(b), "artifactType": t}
            for d, b, t in ((sig, sig_body, SIG_TYPE), (sbom, sbom_body, SBOM_TYPE))]})
        tag = "sha256-" + image.manifest_digest.removeprefix("sha256:")
        put_manifest(registry, repo, tag, index, OCI_INDEX)
        # A signature of one platform manifest of an index, listed by the tag schema.
        multi = images["library/ocimulti:1.0"]
        arm = next(p for p in multi.platforms.values() if p.platform.startswith("linux/arm64"))
        psig, psig_body, _ = _referrer(registry, multi.repo, arm, SIG_TYPE, b'{"arm":1}',
                                       "application/vnd.dev.cosign.simplesigning.v1+json", {})
        put_manifest(registry, multi.repo, "sha256-" + arm.manifest_digest.removeprefix(
            "sha256:"), _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": psig, "size": len(psig_body)}]}),
            OCI_INDEX)
        yield Attached(registry, image, image.manifest_digest, sig, sbom,
                       tuple(dict.fromkeys(sig_blobs + sbom_blobs)), arm.manifest_digest, psig)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, attached: Attached) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path_factory.mktemp("referrers-node"), upstream=attached.registry.url,
                     extra=FAST) as n:
        # A real client pulls the image: the node builds it, with its referrers.
        skopeo("copy", "--src-tls-verify=false", f"docker://127.0.0.1:{n.port}/{IMAGE}",
               f"dir:{tmp_path_factory.mktemp('pulled')}")
        wait_until("the build to be committed", lambda: n.get(
            "/api/inspect-log/docker", params={"image": "alpine:3.16.2"}).status_code == 200)
        yield n
        log = n.log()
    assert "Traceback" not in log and " 500 " not in log, log[-5000:]


def _referrers(node: NodeProcess, digest: str, **params: str) -> httpx.Response:
    return node.get(f"/v2/library/alpine/referrers/{digest}", params=params)


def test_referrers_api_lists_signature_and_sbom(node: NodeProcess, attached: Attached) -> None:
    resp = _referrers(node, attached.subject)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == OCI_INDEX
    assert "oci-filters-applied" not in resp.headers
    index = resp.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    by_digest = {d["digest"]: d for d in index["manifests"]}
    assert set(by_digest) == {attached.signature, attached.sbom}
    sig, sbom = by_digest[attached.signature], by_digest[attached.sbom]
    assert sig["artifactType"] == SIG_TYPE and sbom["artifactType"] == SBOM_TYPE
    assert sig["mediaType"] == sbom["mediaType"] == OCI_MANIFEST
    assert sig["annotations"] == {"dev.cosignproject.cosign/signature": "MEUCIQ-test"}
    assert sbom["annotations"] == {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"}
    for d in index["manifests"]:
        body = node.get(f"/v2/library/alpine/manifests/{d['digest']}",
                        headers={"Accept": OCI_MANIFEST})
        assert body.status_code == 200 and len(body.content) == d["size"]
        assert _digest(body.content) == d["digest"]
    head = node.get(f"/v2/library/alpine/referrers/{attached.subject}")
    assert head.content == resp.content  # the same bytes for the same set


def test_referrers_filter_by_artifact_type(node: NodeProcess, attached: Attached) -> None:
    resp = _referrers(node, attached.subject, artifactType=SBOM_TYPE)
    assert resp.status_code == 200
    assert resp.headers["oci-filters-applied"] == "artifactType"
    assert [d["digest"] for d in resp.json()["manifests"]] == [attached.sbom]
    none = _referrers(node, attached.subject, artifactType="application/x-none")
    assert none.status_code == 200 and none.json()["manifests"] == []
    assert none.headers["oci-filters-applied"] == "artifactType"


def test_referrers_empty_unknown_and_invalid(node: NodeProcess, attached: Attached) -> None:
    for digest in (ZERO, attached.signature, attached.image.layer_digests[0]):
        # Unknown digest, a referrer without referrers, a layer: an empty index, 200.
        resp = _referrers(node, digest)
        assert resp.status_code == 200, (digest, resp.text)
        assert resp.headers["content-type"] == OCI_INDEX
        assert resp.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    bad = _referrers(node, "sha256:nothex")
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "DIGEST_INVALID"
    # Another repository does not see alpine's referrers.
    other = node.get(f"/v2/library/multi/referrers/{attached.subject}")
    assert other.status_code == 200 and other.json()["manifests"] == []
    push = httpx.put(f"{node.url}/v2/library/alpine/referrers/{attached.subject}", content=b"{}",
                     trust_env=False)
    assert push.status_code == 405


def test_tag_schema_with_skopeo(node: NodeProcess, attached: Attached, tmp_path: Path) -> None:
    tag = "sha256-" + attached.subject.removeprefix("sha256:")
    src = f"docker://127.0.0.1:{node.port}/library/alpine"
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"{src}:{tag}").stdout.encode()
    index = json.loads(raw)
    assert index["mediaType"] == OCI_INDEX
    assert {d["digest"] for d in index["manifests"]} == {attached.signature, attached.sbom}
    # The tag's digest is stable (the same set, the same bytes) and it is the API's index.
    again = node.get(f"/v2/library/alpine/manifests/{tag}", headers={"Accept": OCI_INDEX})
    assert again.status_code == 200 and again.content == raw
    assert again.headers["docker-content-digest"] == _digest(raw)
    assert raw == _referrers(node, attached.subject).content
    # A tag-schema tag of a digest without referrers is unknown, as on a registry.
    none = node.get(f"/v2/library/alpine/manifests/sha256-{'0' * 64}")
    assert none.status_code == 404 and none.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # skopeo copies the signature (manifest, config, layer), each verified against the log.
    dest = tmp_path / "sig"
    skopeo("copy", "--src-tls-verify=false", f"{src}@{attached.signature}", f"dir:{dest}")
    got = {_digest(p.read_bytes()) for p in dest.iterdir() if p.name != "version"}
    assert attached.signature in got and set(attached.blobs) & got


def test_referrers_are_logged_and_verified(node: NodeProcess, attached: Attached,
                                           tmp_path: Path) -> None:
    out = run_cli(tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2", port=node.port)
    assert out.returncode == 0, out.stderr
    for digest in (attached.signature, attached.sbom, *attached.blobs):
        assert f"alpine@{digest}" in out.stdout
    assert "artifact_type" not in out.stdout  # the seed's records, unchanged by default
    typed = run_cli(tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2",
                    "--artifact-types", port=node.port)
    assert typed.returncode == 0, typed.stderr
    types = {r["package_specific_artifact_id"]: r.get("artifact_type")
             for r in json.loads(typed.stdout)}
    assert types.pop(f"alpine@{attached.signature}") == SIG_TYPE
    assert types.pop(f"alpine@{attached.sbom}") == SBOM_TYPE
    assert set(types.values()) == {None}  # the image's own artifacts and the referrers' blobs
    refused = run_cli(tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2",
                      "--artifact-types", "--format", "csv", port=node.port)
    assert refused.returncode != 0 and "plain JSON" in refused.stderr
    ok = run_cli(tmp_path, "verify", "docker", "--image", "alpine:3.16.2", "--data-dir",
                 str(node.data_dir))
    assert ok.returncode == 0, ok.stderr
    for digest in (attached.signature, attached.sbom, *attached.blobs):
        assert f"alpine@{digest}" in ok.stdout


def test_peer_serves_referrers_from_the_log(node: NodeProcess, attached: Attached,
                                            tmp_path: Path) -> None:
    """A node without an upstream gets the referrers from its peer, verified against the
    log it synced, and answers the referrers API and the tag schema the same."""
    height = node_status(node)["ledger_height"]
    with NodeProcess(tmp_path / "peer", upstream=None,
                     extra=(*FAST, "--peer", node.url)) as peer:
        wait_until("the peer to sync", lambda: node_status(peer)["ledger_height"] >= height)
        resp = _referrers(peer, attached.subject)
        assert resp.status_code == 200, resp.text
        assert resp.content == _referrers(node, attached.subject).content
        tag = "sha256-" + attached.subject.removeprefix("sha256:")
        src = f"docker://127.0.0.1:{peer.port}/library/alpine"
        raw = skopeo("inspect", "--raw", "--tls-verify=false", f"{src}:{tag}").stdout.encode()
        assert raw == resp.content
        dest = tmp_path / "sbom"
        skopeo("copy", "--src-tls-verify=false", f"{src}@{attached.sbom}", f"dir:{dest}")
        got = {_digest(p.read_bytes()) for p in dest.iterdir() if p.name != "version"}
        assert attached.sbom in got
        assert "pulled from peer" in peer.log()
        assert "Traceback" not in peer.log()



def _two_build_nodes(tmp_path: Path, upstream_a: str, upstream_b: str
                     ) -> tuple[NodeProcess, NodeProcess]:
    a = NodeProcess(tmp_path / "a", upstream=upstream_a, extra=FAST).start()
    b = NodeProcess(tmp_path / "b", upstream=upstream_b, extra=(*FAST, "--peer", a.url))
    try:
        b.start()
        out = run_cli(tmp_path, "authorize", "--peer", node_status(b)["node_id"], "--data-dir",
                      str(a.data_dir), "--force", port=a.port, timeout=120)
        assert out.returncode == 0, out.stderr
        ids = {node_status(a)["node_id"], node_status(b)["node_id"]}
        for n in (a, b):
            wait_until("2 build nodes",
                       lambda n=n: set(node_status(n)["authorized_build_nodes"]) == ids)
    except BaseException:
        b.stop()
        a.stop()
        raise
    return a, b


def test_referrers_of_a_platform_manifest(node: NodeProcess, attached: Attached,
                                          tmp_path: Path) -> None:
    """A referrer of one platform manifest of an index is built with the index."""
    skopeo("copy", "--all", "--src-tls-verify=false",
           f"docker://127.0.0.1:{node.port}/library/ocimulti:1.0", f"dir:{tmp_path / 'm'}")
    wait_until("the build to be committed", lambda: node.get(
        "/api/inspect-log/docker", params={"image": "ocimulti:1.0"}).status_code == 200)
    resp = node.get(f"/v2/library/ocimulti/referrers/{attached.platform}")
    assert resp.status_code == 200
    [only] = resp.json()["manifests"]
    assert only["digest"] == attached.platform_signature and only["artifactType"] == SIG_TYPE
    top = json.loads(skopeo("inspect", "--raw", "--tls-verify=false",
                            f"docker://127.0.0.1:{node.port}/library/ocimulti:1.0").stdout)
    index_digest = _digest(node.get("/v2/library/ocimulti/manifests/1.0",
                                    headers={"Accept": top["mediaType"]}).content)
    assert node.get(f"/v2/library/ocimulti/referrers/{index_digest}").json()["manifests"] == []
    typed = json.loads(run_cli(tmp_path, "inspect-log", "docker", "--image", "ocimulti:1.0",
                               "--artifact-types", port=node.port).stdout)
    assert {r["package_specific_artifact_id"]: r["artifact_type"] for r in typed
            if "artifact_type" in r} == {f"ocimulti@{attached.platform_signature}": SIG_TYPE}


def test_validator_rebuilds_and_accepts_referrers(tmp_path: Path, attached: Attached) -> None:
    """Two build nodes: the image's records, referrers included, commit only once the
    validator rebuilt them all (its own build found the same referrers upstream)."""
    a, b = _two_build_nodes(tmp_path, attached.registry.url, attached.registry.url)
    try:
        out = run_cli(tmp_path, "build", "docker", "--image", "alpine:3.16.2", port=a.port)
        assert out.returncode == 0, out.stderr
        wait_until("the build to commit on b", lambda: run_cli(
            tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2", port=b.port
        ).returncode == 0, timeout=90)
        records = json.loads(run_cli(tmp_path, "inspect-log", "docker", "--image",
                                     "alpine:3.16.2", port=b.port).stdout)
        ids = {r["package_specific_artifact_id"] for r in records}
        assert {f"alpine@{attached.signature}", f"alpine@{attached.sbom}"} <= ids
        assert len(records) == len(ids) == 4 + 2 + len(attached.blobs)
        resp = _referrers(b, attached.subject)
        assert {d["digest"] for d in resp.json()["manifests"]} == {attached.signature,
                                                                   attached.sbom}
    finally:
        b.stop()
        a.stop()


def test_validator_refuses_referrers_it_cannot_rebuild(tmp_path: Path, attached: Attached
                                                       ) -> None:
    """The validator's upstream has the same image without the referrers: it cannot
    vouch for the signature's records, so the proposal never commits."""
    with UpstreamRegistry(tmp_path / "plain") as plain:
        seed_images(plain, (next(s for s in STANDARD_IMAGES if s.reference == IMAGE),),
                    workdir=tmp_path / "plain-layouts")
        fetched = httpx.get(f"{plain.url}/v2/library/alpine/manifests/3.16.2", trust_env=False,
                            headers={"Accept": attached.image.media_type})
        assert _digest(fetched.content) == attached.subject  # the very same image
        a, b = _two_build_nodes(tmp_path, attached.registry.url, plain.url)
        try:
            height = node_status(a)["ledger_height"]
            out = run_cli(tmp_path, "build", "docker", "--image", "alpine:3.16.2", port=a.port)
            assert out.returncode == 0, out.stderr
            wait_until("b to refuse the proposal", lambda: "DIFFERENT hashes or failed"
                       in b.log(), timeout=60)
            # What b could not rebuild: an artifact only the referrers have.
            assert any(f"did not yield the requested 'alpine@{d}'" in b.log()
                       for d in (attached.signature, attached.sbom, *attached.blobs))
            assert node_status(a)["ledger_height"] == height
            assert run_cli(tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2",
                           port=a.port).returncode != 0
        finally:
            b.stop()
            a.stop()
