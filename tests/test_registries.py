"""Many upstream registries at once: ``--upstream ghcr.io=URL`` next to Docker Hub's.

Two real ``docker-registry`` processes on 127.0.0.1 play "docker.io" and "ghcr.io" (the
latter behind bearer-token auth), both holding ``library/alpine:3.16.2`` with different
content; a real containerd (``ctr --hosts-dir``, one ``hosts.toml`` per registry whose
``server`` is a closed local port) and skopeo pull each through one node.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pyrsia_pkg_docker._model import ImageRef, ReferenceError_, logged_name, split_registry
from pyrsia_pkg_docker._registries import parse_registries
from pyrsia_pkg_docker._upstream import RegistryUpstream
from support.clients import skopeo
from support.fixtures import SeededUpstream
from support.images import ImageSpec, seed_images
from support.net import free_port
from support.node import NodeProcess, run_cli
from support.registry import UpstreamRegistry
from support.tokenauth import TokenAuthRegistry
from test_setup import Containerd, _ctr_digest, _setup, containerd_pair  # noqa: F401

from pyrsia_core import Digest

GHCR_IMAGES = (
    ImageSpec("library/alpine", "3.16.2", "v2s2", seed="ghcr-alpine-3.16.2"),
    ImageSpec("org/app", "1.0", "oci", seed="ghcr-org-app-1.0"),
    ImageSpec("library/multi", "1.0", "v2s2", seed="ghcr-multi-1.0", archs=("amd64", "arm64/v8")),
)
ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
          "application/vnd.oci.image.manifest.v1+json"}


# --------------------------------------------------------------------------- pure


def test_image_refs_of_other_registries_keep_their_registry() -> None:
    hub = ImageRef.parse("alpine:3.16.2")
    assert (hub.registry, hub.repository, hub.package_id) == (
        "docker.io", "library/alpine", "alpine:3.16.2")
    assert ImageRef.parse("docker.io/library/alpine:3.16.2") == hub
    assert ImageRef.parse("registry-1.docker.io/library/alpine:3.16.2") == hub
    ghcr = ImageRef.parse("ghcr.io/org/app:1.0")
    assert (ghcr.registry, ghcr.repository, ghcr.package_id) == ("ghcr.io", "org/app",
                                                                 "ghcr.io/org/app:1.0")
    digest = Digest.of(b"x")
    assert ghcr.artifact_id(digest) == f"ghcr.io/org/app@{digest}"
    # Another registry's one-component name gets no "library/".
    assert ImageRef.parse("quay.io/app:1").repository == "app"
    port = ImageRef.parse("localhost:5000/org/app:2")
    assert (port.registry, port.package_id) == ("localhost:5000", "localhost:5000/org/app:2")
    assert logged_name("localhost:5000/org/app:2") == "localhost:5000/org/app"
    assert logged_name(f"ghcr.io/org/app@{digest}") == "ghcr.io/org/app"
    assert logged_name("alpine:3.16.2") == "alpine"
    assert ImageRef.parse("ghcr.io/library/alpine:3.16.2").package_id != hub.package_id
    assert split_registry("some/nested/repo") == (None, "some/nested/repo")
    for bad in ("bad_host.io/org/app:1", "-x.io/app:1", "ghcr.io:99999999/app:1"):
        with pytest.raises(ReferenceError_):
            ImageRef.parse(bad)


def test_registry_options_are_checked(tmp_path: Path) -> None:
    creds = tmp_path / "ghcr.credentials"
    creds.write_text("bot:s3cret\n")
    sources = parse_registries("ghcr.io=http://127.0.0.1:1,Quay.io=http://127.0.0.1:2",
                               f"ghcr.io={creds}")
    assert sorted(sources) == ["ghcr.io", "quay.io"]
    assert sources["ghcr.io"].credentials() == ("bot", "s3cret")
    assert sources["quay.io"].credentials() is None
    assert "s3cret" not in repr(sources)
    from pyrsia_core.errors import UsageError
    for registries, credentials in (("example.org", ""), ("ghcr.io=ftp://x", ""),
                                    ("bad_host=http://x", ""), ("docker.io=http://x", ""),
                                    ("ghcr.io=http://x", f"quay.io={creds}"),
                                    ("ghcr.io=http://x", f"docker.io={creds}")):
        with pytest.raises(UsageError):
            parse_registries(registries, credentials)
    (tmp_path / "bad").write_text("no-colon")
    with pytest.raises(UsageError, match="user:password"):
        parse_registries("ghcr.io=http://x", f"ghcr.io={tmp_path / 'bad'}")["ghcr.io"].open()


@pytest.mark.anyio
async def test_basic_credentials_answer_a_basic_challenge() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != "Basic Ym90OnMzY3JldA==":
            return httpx.Response(401, headers={"www-authenticate": 'Basic realm="r"'})
        return httpx.Response(200, stream=httpx.ByteStream(b"{}"),
                              headers={"content-type": "application/json"})

    upstream = RegistryUpstream("http://registry.invalid", auth=("bot", "s3cret"),
                                transport=httpx.MockTransport(handler))
    try:
        resp = await upstream.open("org/app/blobs/sha256:" + "0" * 64)
        assert b"".join([c async for c in resp.body]) == b"{}"
    finally:
        await upstream.aclose()
    assert seen == [None, "Basic Ym90OnMzY3JldA=="]


def test_cli_upstream_flags_become_package_options() -> None:
    from pyrsia_cli._main import _upstreams

    hub, options = _upstreams(["http://127.0.0.1:1", "ghcr.io=http://127.0.0.1:2",
                               "quay.io=http://127.0.0.1:3"], ["ghcr.io=/c"], {})
    assert hub == "http://127.0.0.1:1"
    assert options == {"docker": {"registries": "ghcr.io=http://127.0.0.1:2,"
                                                "quay.io=http://127.0.0.1:3",
                                  "credentials": "ghcr.io=/c"}}
    hub, options = _upstreams(["docker.io=http://127.0.0.1:4"], [], {"maven": {"a": "b"}})
    assert (hub, options) == ("http://127.0.0.1:4", {"maven": {"a": "b"}})
    # Well-known public registries by name (no request is made: only the config is read).
    _, options = _upstreams(["quay.io", "registry.k8s.io"], [], {}, {"idle_timeout": "5"})
    sources = parse_registries(options["docker"]["registries"], "",
                               options["docker"]["upstream_options"])
    assert {h: s.url for h, s in sources.items()} == {"quay.io": "https://quay.io",
                                                      "registry.k8s.io": "https://registry.k8s.io"}
    assert sources["quay.io"].options == (("idle_timeout", "5"),)
    from pyrsia_core.errors import UsageError
    with pytest.raises(UsageError):
        parse_registries("example.org")  # not well known: a URL is needed
    with pytest.raises(UsageError):
        parse_registries("ghcr.io=http://x", "", "idle_timeout=never")


# --------------------------------------------------------------------------- processes


@pytest.fixture
def ghcr(tmp_path: Path) -> Iterator[tuple[TokenAuthRegistry, dict[str, object]]]:
    with UpstreamRegistry(tmp_path / "ghcr-plain") as plain:
        images = seed_images(plain, GHCR_IMAGES, workdir=tmp_path / "ghcr-layouts")
        with TokenAuthRegistry(tmp_path / "ghcr", backing=plain) as registry:
            yield registry, dict(images)


@pytest.fixture
def two_registry_node(
    fresh_seeded_upstream: SeededUpstream, ghcr: tuple[TokenAuthRegistry, dict[str, object]],
    tmp_path: Path,
) -> Iterator[NodeProcess]:
    creds = tmp_path / "ghcr.credentials"
    creds.write_text("bot:never-logged-pw\n")
    with NodeProcess(tmp_path / "node", upstream=fresh_seeded_upstream.url,
                     extra=("--upstream", f"ghcr.io={ghcr[0].url}",
                            "--upstream-credentials", f"ghcr.io={creds}")) as node:
        yield node


def _digest(images: dict[str, object], key: str) -> str:
    return str(images[key].manifest_digest)


@pytest.mark.process
def test_containerd_pulls_each_registry_through_one_node(
    fresh_seeded_upstream: SeededUpstream, ghcr: tuple[TokenAuthRegistry, dict[str, object]],
    two_registry_node: NodeProcess, tmp_path: Path,
    containerd_pair: tuple[Containerd, Containerd],  # noqa: F811
) -> None:
    node = two_registry_node
    ghcr_registry, ghcr_images = ghcr
    certs = tmp_path / "certs.d"
    closed = f"http://127.0.0.1:{free_port()}"  # nothing leaves the machine
    out = _setup(tmp_path, "containerd", "--node", f"127.0.0.1:{node.port}",
                 "--config-dir", str(certs), "--fallback", closed)
    assert out.returncode == 0, out.stderr
    (certs / "ghcr.io").mkdir()
    (certs / "ghcr.io" / "hosts.toml").write_text((certs / "docker.io" / "hosts.toml").read_text())
    first, _ = containerd_pair
    pull = ["images", "pull", "--hosts-dir", str(certs), "--snapshotter", "native"]
    first.ctr(*pull, "docker.io/library/alpine:3.16.2")
    first.ctr(*pull, "ghcr.io/library/alpine:3.16.2")
    hub_want = fresh_seeded_upstream.images["library/alpine:3.16.2"].manifest_digest
    ghcr_want = _digest(ghcr_images, "library/alpine:3.16.2")
    assert hub_want != ghcr_want
    assert _ctr_digest(first, "docker.io/library/alpine:3.16.2") == hub_want
    assert _ctr_digest(first, "ghcr.io/library/alpine:3.16.2") == ghcr_want
    # ghcr.io's went through its token flow, with the node's basic credentials.
    token_requests = ghcr_registry.token_server.requests
    assert token_requests and all(r.authorization and r.authorization.startswith("Basic ")
                                  for r in token_requests)
    assert "never-logged-pw" not in node.log()
    # A multi-arch image of ghcr.io: containerd picks its platform from the index.
    first.ctr(*pull, "--platform", "linux/arm64", "ghcr.io/library/multi:1.0")
    assert _ctr_digest(first, "ghcr.io/library/multi:1.0") == _digest(ghcr_images,
                                                                      "library/multi:1.0")
    # The log names each with its registry: Docker Hub's keep the seed's ids.
    hub_log = json.loads(run_cli(tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2",
                                 port=node.port).stdout)
    ghcr_log = json.loads(run_cli(tmp_path, "inspect-log", "docker", "--image",
                                  "ghcr.io/library/alpine:3.16.2", port=node.port).stdout)
    assert {r["package_specific_id"] for r in hub_log} == {"alpine:3.16.2"}
    assert {r["package_specific_id"] for r in ghcr_log} == {"ghcr.io/library/alpine:3.16.2"}
    ghcr_ids = {r["package_specific_artifact_id"] for r in ghcr_log}
    assert f"ghcr.io/library/alpine@{ghcr_want}" in ghcr_ids
    assert all(i.startswith("ghcr.io/library/alpine") for i in ghcr_ids)
    assert not {r["artifact_hash"] for r in hub_log} & {r["artifact_hash"] for r in ghcr_log}


@pytest.mark.process
def test_skopeo_names_the_registry_in_the_path(
    ghcr: tuple[TokenAuthRegistry, dict[str, object]], two_registry_node: NodeProcess,
    tmp_path: Path,
) -> None:
    node = two_registry_node
    out = skopeo("copy", "--src-tls-verify=false",
                 f"docker://127.0.0.1:{node.port}/ghcr.io/org/app:1.0", f"dir:{tmp_path / 'x'}")
    assert out.returncode == 0
    got = Digest.of((tmp_path / "x" / "manifest.json").read_bytes())
    assert str(got) == _digest(ghcr[1], "org/app:1.0")
    built = run_cli(tmp_path, "build", "docker", "--image", "ghcr.io/org/app:1.0",
                    port=node.port)
    assert built.returncode != 0 and "Artifact already exists" in built.stderr, built.stderr
    ok = run_cli(tmp_path, "verify", "docker", "--image", "ghcr.io/org/app:1.0", "--data-dir",
                 str(node.data_dir))
    assert ok.returncode == 0 and "stored artifact(s) hash correctly" in ok.stdout, ok.stderr
    # Docker Hub has no org/app: its id is not ghcr.io's.
    hub = run_cli(tmp_path, "verify", "docker", "--image", "org/app:1.0", "--data-dir",
                  str(node.data_dir))
    assert hub.returncode == 1 and "no log record" in hub.stderr
    assert f"docker ghcr.io={ghcr[0].url}" in node.log()  # the startup line names it


@pytest.mark.process
def test_bad_registry_requests_are_refused_without_an_upstream_request(
    fresh_seeded_upstream: SeededUpstream, ghcr: tuple[TokenAuthRegistry, dict[str, object]],
    two_registry_node: NodeProcess,
) -> None:
    node = two_registry_node
    hub_mark, ghcr_mark = fresh_seeded_upstream.registry.mark(), ghcr[0].mark()
    cases = [
        ("/v2/library/alpine/manifests/3.16.2?ns=quay.io", 404, "NAME_UNKNOWN"),
        ("/v2/quay.io/library/alpine/manifests/3.16.2", 404, "NAME_UNKNOWN"),
        ("/v2/ghcr.io/library/alpine/manifests/3.16.2?ns=docker.io", 403, "DENIED"),
        ("/v2/docker.io/library/alpine/manifests/3.16.2?ns=ghcr.io", 403, "DENIED"),
        ("/v2/bad_host.io/org/app/manifests/1.0", 400, "NAME_INVALID"),
        ("/v2/library/alpine/manifests/3.16.2?ns=bad_host", 400, "NAME_INVALID"),
        ("/v2/ghcr.io/org/app/blobs/sha256:" + "0" * 64 + "?ns=quay.io", 403, "DENIED"),
    ]
    for path, status, code in cases:
        resp = httpx.get(node.url + path, headers=ACCEPT, timeout=30)
        assert resp.status_code == status, (path, resp.text)
        assert resp.json()["errors"][0]["code"] == code, (path, resp.text)
    assert fresh_seeded_upstream.registry.requests_since(hub_mark) == []
    assert ghcr[0].requests_since(ghcr_mark) == []
    # ?ns=ghcr.io and the path prefix reach the same image.
    a = httpx.get(node.url + "/v2/org/app/manifests/1.0?ns=ghcr.io", headers=ACCEPT, timeout=60)
    b = httpx.get(node.url + "/v2/ghcr.io/org/app/manifests/1.0", headers=ACCEPT, timeout=60)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.headers["docker-content-digest"] == b.headers["docker-content-digest"] == _digest(
        ghcr[1], "org/app:1.0")
    # Docker Hub has no org/app: the node does not serve ghcr.io's under Docker Hub's name.
    hub = httpx.get(node.url + "/v2/org/app/manifests/1.0", headers=ACCEPT, timeout=60)
    assert hub.status_code == 404, hub.text
    tags = httpx.get(node.url + "/v2/ghcr.io/org/app/tags/list", timeout=60)
    assert tags.status_code == 200 and tags.json()["tags"] == ["1.0"], tags.text
    assert httpx.get(node.url + "/v2/org/app/tags/list", timeout=60).status_code == 404


def _hosts_toml(closed: str, *hosts: str) -> str:
    lines = [f'server = "{closed}"', ""]
    for host in hosts:
        lines += [f'[host."{host}"]', '  capabilities = ["pull", "resolve"]', ""]
    return "\n".join(lines)


@pytest.mark.process
def test_containerd_falls_back_to_its_next_host_when_the_node_fails(
    ghcr: tuple[TokenAuthRegistry, dict[str, object]], tmp_path: Path,
    containerd_pair: tuple[Containerd, Containerd],  # noqa: F811
) -> None:
    ghcr_registry, ghcr_images = ghcr
    assert ghcr_registry.backing is not None
    closed = f"http://127.0.0.1:{free_port()}"
    # The second host: another registry with ghcr.io's content (a plain mirror).
    with UpstreamRegistry(tmp_path / "mirror",
                          storage_dir=ghcr_registry.backing.storage_dir) as mirror:
        # The node's ghcr.io upstream is down: it answers 503 UNAVAILABLE.
        with NodeProcess(tmp_path / "node", upstream=closed,
                         extra=("--upstream", f"ghcr.io={closed}")) as node:
            certs = tmp_path / "certs.d"
            (certs / "ghcr.io").mkdir(parents=True)
            (certs / "ghcr.io" / "hosts.toml").write_text(
                _hosts_toml(closed, node.url, mirror.url))
            first, second = containerd_pair
            pull = ["images", "pull", "--hosts-dir", str(certs), "--snapshotter", "native"]
            resp = httpx.get(node.url + "/v2/ghcr.io/org/app/manifests/1.0", headers=ACCEPT,
                             timeout=60)
            assert resp.status_code == 503, resp.text
            mark = mirror.mark()
            first.ctr(*pull, "ghcr.io/org/app:1.0")
            assert _ctr_digest(first, "ghcr.io/org/app:1.0") == _digest(ghcr_images,
                                                                        "org/app:1.0")
            assert mirror.manifest_fetches_since(mark)
            port = node.port
        # The node is stopped: containerd goes to the mirror.
        (certs / "ghcr.io" / "hosts.toml").write_text(
            _hosts_toml(closed, f"http://127.0.0.1:{port}", mirror.url))
        second.ctr(*pull, "ghcr.io/library/alpine:3.16.2")
        assert _ctr_digest(second, "ghcr.io/library/alpine:3.16.2") == _digest(
            ghcr_images, "library/alpine:3.16.2")


@pytest.mark.process
def test_a_hanging_registry_is_answered_within_bounded_time(
    fresh_seeded_upstream: SeededUpstream, tmp_path: Path,
) -> None:
    from support.hostile import HostileUpstream

    with HostileUpstream() as tarpit:
        tarpit.route("/v2/org/app/manifests/1.0", lambda handler: tarpit.sleep(120))
        with NodeProcess(tmp_path / "node", upstream=fresh_seeded_upstream.url,
                         extra=("--upstream", f"ghcr.io={tarpit.url}",
                                "--upstream-option", "idle_timeout=2",
                                "--upstream-option", "timeout=3")) as node:
            start = time.monotonic()
            resp = httpx.get(node.url + "/v2/ghcr.io/org/app/manifests/1.0", headers=ACCEPT,
                             timeout=60)
            elapsed = time.monotonic() - start
            assert resp.status_code == 503, resp.text
            assert resp.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert elapsed < 15, elapsed  # the default idle timeout alone is 30 s
            assert tarpit.count("/v2/org/app/manifests/1.0") >= 1
            # Docker Hub's images are served meanwhile.
            hub = httpx.get(node.url + "/v2/library/alpine/manifests/3.16.2", headers=ACCEPT,
                            timeout=60)
            assert hub.status_code == 200


@pytest.mark.process
def test_validators_rebuild_from_the_image_registry(
    fresh_seeded_upstream: SeededUpstream, ghcr: tuple[TokenAuthRegistry, dict[str, object]],
    tmp_path: Path,
) -> None:
    """Both build nodes must agree on ghcr.io's image: Docker Hub's of the same name has
    other content, so a validator rebuilding from the wrong registry would vote it down."""
    from support.node import node_status, wait_until
    from test_consensus_nodes import FAST, authorize

    extra = (*FAST, "--upstream", f"ghcr.io={ghcr[0].url}")
    with NodeProcess(tmp_path / "a", upstream=fresh_seeded_upstream.url, extra=extra) as a, \
            NodeProcess(tmp_path / "b", upstream=fresh_seeded_upstream.url,
                        extra=(*extra, "--peer", a.url)) as b:
        authorize(tmp_path, a, b, force=True)
        ids = {node_status(n)["node_id"] for n in (a, b)}
        for n in (a, b):
            wait_until(f"{n.url} to list 2 build nodes",
                       lambda n=n: set(node_status(n)["authorized_build_nodes"]) == ids)
        mark = ghcr[0].mark()
        out = run_cli(tmp_path, "build", "docker", "--image", "ghcr.io/library/alpine:3.16.2",
                      port=a.port)
        assert out.returncode == 0, out.stderr
        build_id = out.stdout.split("ID ")[1].split()[0]
        wait_until("the build to succeed", lambda: "SUCCESS" in run_cli(
            tmp_path, "build", "status", "--id", build_id, port=a.port).stdout, timeout=90)
        want = _digest(ghcr[1], "library/alpine:3.16.2")

        def logged() -> bool:
            got = run_cli(tmp_path, "inspect-log", "docker", "--image",
                          "ghcr.io/library/alpine:3.16.2", port=b.port)
            return got.returncode == 0 and want in got.stdout

        wait_until("b to have the record", logged, timeout=60)
        # Each build node fetched the manifest from ghcr.io (the validator rebuilt it there).
        fetches = [e for e in ghcr[0].access_log(mark)
               if e.path.endswith("/library/alpine/manifests/3.16.2") and e.status == 200]
        assert len(fetches) >= 2, fetches


@pytest.mark.process
def test_podman_pulls_ghcr_io_through_a_prefixed_mirror(
    ghcr: tuple[TokenAuthRegistry, dict[str, object]], two_registry_node: NodeProcess,
    podman_dir: Path,
) -> None:
    from support.clients import podman, write_registries_conf

    node = two_registry_node
    conf = write_registries_conf(podman_dir / "registries.conf",
                                 [f"127.0.0.1:{node.port}/ghcr.io"], prefix="ghcr.io")
    podman(podman_dir, "pull", "ghcr.io/library/alpine:3.16.2", registries_conf=conf)
    digest = podman(podman_dir, "image", "inspect", "--format", "{{.Digest}}",
                    "ghcr.io/library/alpine:3.16.2", registries_conf=conf).stdout.strip()
    assert digest == _digest(ghcr[1], "library/alpine:3.16.2")
    assert "Fetching manifest for ghcr.io/library/alpine:3.16.2" in node.log()
