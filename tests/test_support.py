"""The test harness works: registry, deterministic images, token auth, skopeo and podman."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from support.clients import CLOSED_LOCAL_LOCATION, ToolError, podman, skopeo, write_registries_conf
from support.fixtures import SeededUpstream
from support.images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    STANDARD_IMAGES,
    build_image,
    canonical_json,
    fetch_image_info,
    make_image_layout,
    make_multiarch_layout,
    put_manifest,
    seed_images,
    sha256_digest,
    upload_blob,
)
from support.net import free_port, wait_for_http
from support.registry import UpstreamRegistry, parse_access_line
from support.tokenauth import TokenAuthRegistry

ALPINE = "library/alpine:3.16.2"


def _tree_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- pure parts ------------------------------------------------------------------------------


def test_layouts_are_deterministic(tmp_path: Path) -> None:
    for n in ("a", "b"):
        make_image_layout(tmp_path / n / "single", seed="s", layers=2, layer_size=8192, tag="t")
        make_multiarch_layout(tmp_path / n / "multi", seed="m", layer_size=8192, tag="1.0")
    a, b = _tree_digests(tmp_path / "a"), _tree_digests(tmp_path / "b")
    assert a == b
    # single: oci-layout, index.json, 2 layers, config, manifest; multi: oci-layout,
    # index.json, (layer, config, manifest) per platform, the index blob.
    assert len(a) == 6 + 9

    index = json.loads((tmp_path / "a" / "multi" / "index.json").read_bytes())
    (desc,) = index["manifests"]
    assert desc["mediaType"] == OCI_INDEX
    assert desc["annotations"] == {"org.opencontainers.image.ref.name": "1.0"}
    inner = json.loads(
        (tmp_path / "a" / "multi" / "blobs" / "sha256" / desc["digest"][7:]).read_bytes()
    )
    assert [m["platform"] for m in inner["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux"},
    ]


def test_build_image_is_seeded_and_incompressible() -> None:
    one = build_image(seed="x", layers=2, layer_size=20_000)
    assert one == build_image(seed="x", layers=2, layer_size=20_000)
    assert one.manifest_digest != build_image(seed="y", layers=2).manifest_digest
    assert one.layer_digests != build_image(seed="x", layers=2, arch="arm64").layer_digests
    for digest in one.layer_digests:
        assert len(one.blobs[digest]) > 20_000  # random payload: gzip cannot shrink it
        assert sha256_digest(one.blobs[digest]) == digest
    config = json.loads(one.blobs[one.config_digest])
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["rootfs"]["diff_ids"] == list(one.diff_ids)


def test_parse_access_line() -> None:
    line = '127.0.0.1 - - [28/Nov/2026:05:03:21 +0000] "HEAD /v2/a/b/blobs/sha256:00?x=1 HTTP/1.1" 404 157 "" "curl/7.88.1"'  # noqa: E501
    entry = parse_access_line(line)
    assert entry is not None
    assert entry.as_tuple() == ("HEAD", "/v2/a/b/blobs/sha256:00", 404)
    assert entry.query == "x=1" and entry.user_agent == "curl/7.88.1"
    assert parse_access_line('time="..." level=info msg="response completed"') is None


# -- the upstream registry -------------------------------------------------------------------


@pytest.mark.process
def test_registry_starts_stops_and_restarts(tmp_path: Path) -> None:
    registry = UpstreamRegistry(tmp_path / "reg")
    with registry:
        assert registry.running and registry.url == f"http://127.0.0.1:{registry.port}"
        resp = httpx.get(f"{registry.url}/v2/")
        assert resp.status_code == 200
        assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        digest = upload_blob(registry, "some/repo", b"kept across restarts")

        registry.stop()
        assert not registry.running
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{registry.url}/v2/")

        registry.start()  # same port, same storage
        resp = httpx.get(f"{registry.url}/v2/some/repo/blobs/{digest}")
        assert resp.content == b"kept across restarts"
    assert not registry.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{registry.url}/v2/")


@pytest.mark.process
def test_access_log_marks(upstream_registry: UpstreamRegistry) -> None:
    reg = upstream_registry
    digest = upload_blob(reg, "library/x", b"blob")
    mark = reg.mark()
    assert reg.requests_since(mark) == []
    httpx.get(f"{reg.url}/v2/library/x/blobs/{digest}")
    httpx.head(f"{reg.url}/v2/library/x/manifests/nope")
    assert reg.requests_since(mark) == [
        ("GET", f"/v2/library/x/blobs/{digest}", 200),
        ("HEAD", "/v2/library/x/manifests/nope", 404),
    ]
    assert reg.blob_fetches_since(mark) == [f"/v2/library/x/blobs/{digest}"]
    later = reg.mark()
    assert reg.blob_fetches_since(later) == []
    assert len(reg.access_log_lines(mark)) == 2
    assert ("POST", "/v2/library/x/blobs/uploads/", 202) in reg.requests()


@pytest.mark.process
def test_wait_for_http_and_free_port() -> None:
    port = free_port()
    with pytest.raises(TimeoutError):
        wait_for_http(f"http://127.0.0.1:{port}/", timeout=0.3)
    with pytest.raises(ValueError):
        wait_for_http("http://192.0.2.1/", timeout=0.1)


# -- seeded images ---------------------------------------------------------------------------


@pytest.mark.process
def test_seeded_images_as_the_registry_reports_them(seeded_upstream: SeededUpstream) -> None:
    images = seeded_upstream.images
    assert set(images) == {s.reference for s in STANDARD_IMAGES}

    alpine = images[ALPINE]
    assert alpine.media_type == DOCKER_MANIFEST
    assert json.loads(alpine.manifest)["mediaType"] == DOCKER_MANIFEST
    assert len(alpine.layer_digests) == 1 and alpine.config_digest is not None
    assert len(alpine.artifact_digests) == 3  # manifest, config, layer (+ the tag: 4 records)
    assert list(alpine.platforms) == ["linux/amd64"]

    multi = images["library/multi:1.0"]
    assert multi.media_type == DOCKER_MANIFEST_LIST and multi.is_index
    assert set(multi.platforms) == {"linux/amd64", "linux/arm64/v8"}
    assert {p.media_type for p in multi.platforms.values()} == {DOCKER_MANIFEST}

    ocimulti = images["library/ocimulti:1.0"]
    assert ocimulti.media_type == OCI_INDEX
    assert {p.media_type for p in ocimulti.platforms.values()} == {OCI_MANIFEST}
    assert set(ocimulti.platforms) == {"linux/amd64", "linux/arm64/v8"}

    ociimage = images["library/ociimage:1.0"]
    assert ociimage.media_type == OCI_MANIFEST and len(ociimage.layer_digests) == 2
    # OCI pushes keep our bytes: the digest is the one computed offline.
    assert (
        ociimage.manifest_digest
        == build_image(seed="ociimage-1.0", layers=2, layer_size=16 * 1024).manifest_digest
    )

    nested = images["some/nested/repo:v1"]
    assert nested.media_type == DOCKER_MANIFEST and nested.repo == "some/nested/repo"

    # Every digest is of the exact bytes served.
    with httpx.Client(base_url=seeded_upstream.url) as client:
        for info in images.values():
            for digest in info.blob_digests:
                resp = client.get(f"/v2/{info.repo}/blobs/{digest}")
                assert sha256_digest(resp.content) == digest


@pytest.mark.process
def test_skopeo_reads_seeded_images(seeded_upstream: SeededUpstream) -> None:
    host = seeded_upstream.host
    out = skopeo("inspect", "--tls-verify=false", f"docker://{host}/{ALPINE}", timeout=60)
    assert json.loads(out.stdout)["Digest"] == seeded_upstream[ALPINE].manifest_digest

    raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{host}/library/multi:1.0")
    listing = json.loads(raw.stdout)
    assert listing["mediaType"] == DOCKER_MANIFEST_LIST
    assert [m["platform"]["architecture"] for m in listing["manifests"]] == ["amd64", "arm64"]
    assert (
        sha256_digest(raw.stdout.encode()) == seeded_upstream["library/multi:1.0"].manifest_digest
    )

    with pytest.raises(ToolError) as err:
        skopeo("inspect", "--tls-verify=false", f"docker://{host}/library/alpine:missing")
    assert "manifest unknown" in err.value.stderr


@pytest.mark.process
def test_seeding_twice_gives_identical_digests(
    seeded_upstream: SeededUpstream, tmp_path: Path
) -> None:
    with UpstreamRegistry(tmp_path / "again") as again:
        images = seed_images(again, STANDARD_IMAGES[:2], workdir=tmp_path / "layouts")
    for ref, info in images.items():
        assert info.artifact_digests == seeded_upstream[ref].artifact_digests


@pytest.mark.process
def test_raw_push_api(upstream_registry: UpstreamRegistry) -> None:
    reg = upstream_registry
    image = build_image(seed="raw", layer_size=1024)
    for digest in (image.config_digest, *image.layer_digests):
        assert upload_blob(reg, "raw/image", image.blobs[digest]) == digest
    manifest = json.loads(image.manifest)
    manifest["mediaType"] = DOCKER_MANIFEST
    manifest["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json"
    for layer in manifest["layers"]:
        layer["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    body = canonical_json(manifest)
    digest = put_manifest(reg, "raw/image", "v1", body, DOCKER_MANIFEST)
    info = fetch_image_info(reg, "raw/image", "v1")
    assert (info.manifest_digest, info.manifest, info.media_type) == (digest, body, DOCKER_MANIFEST)


# -- token auth ------------------------------------------------------------------------------


@pytest.mark.process
def test_token_auth_by_hand(
    token_upstream: TokenAuthRegistry, seeded_upstream: SeededUpstream
) -> None:
    hub = token_upstream
    alpine = seeded_upstream[ALPINE]
    mark, tokens_before = hub.mark(), hub.token_server.request_count
    manifest_url = f"{hub.url}/v2/library/alpine/manifests/3.16.2"
    with httpx.Client() as client:
        resp = client.get(f"{hub.url}/v2/")
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"] == hub.challenge()
        resp = client.get(manifest_url, headers={"Accept": MANIFEST_ACCEPT})
        assert resp.status_code == 401
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge == (
            f'Bearer realm="http://127.0.0.1:{hub.token_server.port}/token",'
            'service="registry.test",scope="repository:library/alpine:pull"'
        )
        resp = client.get(
            f"{hub.url}/v2/library/alpine/manifests/3.16.2",
            headers={"Authorization": "Bearer nonsense"},
        )
        assert resp.status_code == 401

        token_resp = client.get(
            hub.realm,
            params={"service": "registry.test", "scope": "repository:library/alpine:pull"},
        )
        assert token_resp.status_code == 200
        body = token_resp.json()
        assert body["token"] == body["access_token"] and body["expires_in"] == 300
        auth = {"Authorization": f"Bearer {body['token']}", "Accept": MANIFEST_ACCEPT}

        resp = client.get(manifest_url, headers=auth)
        assert resp.status_code == 200
        assert resp.headers["Docker-Content-Digest"] == alpine.manifest_digest
        assert resp.headers["Content-Type"] == DOCKER_MANIFEST
        resp = client.head(
            f"{hub.url}/v2/library/alpine/blobs/{alpine.layer_digests[0]}", headers=auth
        )
        assert resp.status_code == 200 and int(resp.headers["Content-Length"]) > 16 * 1024
        expired = hub.issue_token("repository:library/alpine:pull", expires_in=-120)
        resp = client.get(manifest_url, headers={"Authorization": f"Bearer {expired}"})
        assert (
            resp.status_code == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
        )
        # The token is scoped: another repository needs its own.
        resp = client.get(f"{hub.url}/v2/library/multi/manifests/1.0", headers=auth)
        assert (
            resp.status_code == 401
            and 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
        )

    assert hub.token_server.request_count == tokens_before + 1
    assert hub.token_server.requests[-1].scopes == ("repository:library/alpine:pull",)
    assert len(hub.unauthorized_since(mark)) == 5
    assert httpx.get(hub.realm, params={"service": "other"}).status_code == 400


@pytest.mark.process
def test_token_auth_with_skopeo(
    token_upstream: TokenAuthRegistry, seeded_upstream: SeededUpstream
) -> None:
    hub = token_upstream
    mark, tokens_before = hub.mark(), hub.token_server.request_count
    out = skopeo("inspect", "--tls-verify=false", f"docker://{hub.host}/library/multi:1.0")
    assert json.loads(out.stdout)["Digest"] == seeded_upstream["library/multi:1.0"].manifest_digest
    assert hub.token_server.request_count > tokens_before
    assert ("GET", "/v2/", 401) in hub.unauthorized_since(mark)
    assert any(r[2] == 200 and "/manifests/" in r[1] for r in hub.requests_since(mark))


# -- podman ----------------------------------------------------------------------------------


@pytest.mark.process
def test_podman_pulls_directly(seeded_upstream: SeededUpstream, podman_dir: Path) -> None:
    host = seeded_upstream.host
    podman(podman_dir, "pull", "--tls-verify=false", f"{host}/{ALPINE}")
    podman(podman_dir, "pull", "--tls-verify=false", "--arch", "arm64", f"{host}/library/multi:1.0")
    fmt = "{{.Architecture}} {{.Digest}}"
    arm = podman(podman_dir, "image", "inspect", "--format", fmt, f"{host}/library/multi:1.0")
    assert arm.stdout.split() == ["arm64", seeded_upstream["library/multi:1.0"].manifest_digest]
    amd = podman(podman_dir, "image", "inspect", "--format", fmt, f"{host}/{ALPINE}")
    assert amd.stdout.split() == ["amd64", seeded_upstream[ALPINE].manifest_digest]


@pytest.mark.process
def test_podman_pulls_through_a_mirror_and_never_falls_back_off_machine(
    seeded_upstream: SeededUpstream, podman_dir: Path
) -> None:
    reg = seeded_upstream.registry
    conf = write_registries_conf(podman_dir / "registries.conf", [reg.host])
    mark = reg.mark()
    podman(podman_dir, "pull", "docker.io/library/ocimulti:1.0", registries_conf=conf)
    info = seeded_upstream["library/ocimulti:1.0"]
    amd64 = info.platforms["linux/amd64"]
    assert sorted(reg.requests_since(mark)) == sorted(
        [
            ("GET", "/v2/", 200),
            ("GET", "/v2/library/ocimulti/manifests/1.0", 200),
            ("GET", f"/v2/library/ocimulti/manifests/{amd64.manifest_digest}", 200),
            *[("GET", f"/v2/library/ocimulti/blobs/{d}", 200) for d in amd64.blob_digests],
        ]
    )
    # When the mirror has nothing, the fallback goes to the closed local port, not Docker Hub.
    with pytest.raises(ToolError) as err:
        podman(podman_dir, "pull", "docker.io/library/absent:1.0", registries_conf=conf)
    assert f"http://{CLOSED_LOCAL_LOCATION}/v2/" in err.value.stderr
    assert "docker.io/v2" not in err.value.stderr and "registry-1.docker.io" not in err.value.stderr
