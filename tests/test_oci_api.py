"""The node's OCI Distribution pull API, over real HTTP against a real node process.

Every request goes over a socket to ``pyrsia node start``: httpx for ordinary requests, raw
sockets where a client library would normalize or refuse what we send (``..`` in paths, TLS
probes, garbage request lines).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.fixtures import SeededUpstream
from support.images import put_manifest, upload_blob
from support.node import NodeProcess
from support.registry import UpstreamRegistry

pytestmark = pytest.mark.process

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
#: What podman/skopeo send: one ``Accept:`` header line per media type.
PODMAN_ACCEPT = [
    ("Accept", OCI_MANIFEST),
    ("Accept", DOCKER_MANIFEST),
    ("Accept", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
    ("Accept", "application/vnd.docker.distribution.manifest.v1+json"),
    ("Accept", DOCKER_LIST),
    ("Accept", OCI_INDEX),
]
IMAGES = ["library/alpine:3.16.2", "library/multi:1.0", "library/ocimulti:1.0",
          "library/ociimage:1.0", "some/nested/repo:v1"]
ZERO = "sha256:" + "0" * 64


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory,
         seeded_upstream: SeededUpstream) -> Iterator[NodeProcess]:
    """One node for every test that only reads (builds are idempotent)."""
    with NodeProcess(tmp_path_factory.mktemp("oci-node"), upstream=seeded_upstream.url) as n:
        yield n
        log = n.log()
    # Nothing any test sent made the node fail internally.
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-5000:]
    assert " 500 " not in log


@pytest.fixture(scope="module")
def client(node: NodeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=node.url, timeout=30, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def alpine(client: httpx.Client, seeded_upstream: SeededUpstream) -> Any:
    """``library/alpine:3.16.2``, built on the module's node."""
    assert client.get("/v2/library/alpine/manifests/3.16.2",
                      headers=PODMAN_ACCEPT).status_code == 200
    wait_committed(client, "alpine:3.16.2")
    return seeded_upstream.images["library/alpine:3.16.2"]


def wait_committed(c: httpx.Client, image: str, timeout: float = 20) -> None:
    """Until the build of ``image`` is in the log (clients are served while it runs)."""
    deadline = time.monotonic() + timeout
    while c.get("/api/inspect-log/docker", params={"image": image}).status_code != 200:
        assert time.monotonic() < deadline, f"{image} never reached the log"
        time.sleep(0.05)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert isinstance(body["errors"], list) and body["errors"]
    err = body["errors"][0]
    assert err["code"] == code, body
    assert isinstance(err["message"], str) and err["message"]
    assert int(resp.headers["content-length"]) == len(resp.content)
    return dict(err)


def raw(port: int, data: bytes, *, timeout: float = 10, one: bool = False) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or, with
    ``one``, until one complete response with a ``Content-Length`` has arrived)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
            if one and _complete(reply):
                break
    return reply


def _complete(reply: bytes) -> bool:
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return m is not None and len(body) >= int(m[1])


def raw_get(port: int, target: str | bytes, *extra: bytes) -> tuple[int, dict[str, str], bytes]:
    """One ``GET target`` with ``Connection: close``, the target sent exactly as given."""
    if isinstance(target, str):
        target = target.encode()
    head = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    reply = raw(port, head + b"".join(h + b"\r\n" for h in extra) + b"\r\n")
    return parse_reply(reply)


def parse_reply(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), reply[:200]
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


def client_hello() -> bytes:
    """The first flight of a real TLS client (what the docker CLI sends to probe a mirror)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"
    return hello


def assert_still_serving(client: httpx.Client) -> None:
    resp = client.get("/v2/")
    assert resp.status_code == 200


# -- /v2/ -------------------------------------------------------------------------------------


def test_base_endpoint(client: httpx.Client) -> None:
    for method in ("GET", "HEAD"):
        resp = client.request(method, "/v2/")
        assert resp.status_code == 200
        assert resp.headers["docker-distribution-api-version"] == "registry/2.0"
        if method == "HEAD":
            assert resp.content == b""
    assert client.get("/v2").status_code == 200


# -- manifests --------------------------------------------------------------------------------


@pytest.mark.parametrize("image", IMAGES)
def test_manifest_get_and_head_by_tag_and_digest(
    client: httpx.Client, seeded_upstream: SeededUpstream, image: str
) -> None:
    info = seeded_upstream.images[image]
    repo, _, tag = image.rpartition(":")
    for ref in (tag, info.manifest_digest):
        resp = client.get(f"/v2/{repo}/manifests/{ref}", headers=PODMAN_ACCEPT)
        assert resp.status_code == 200, resp.text
        assert resp.content == info.manifest  # the upstream's bytes, unchanged
        assert sha256(resp.content) == info.manifest_digest
        assert resp.headers["docker-content-digest"] == info.manifest_digest
        assert resp.headers["content-type"] == info.media_type
        assert int(resp.headers["content-length"]) == len(resp.content)
        assert resp.headers["docker-distribution-api-version"] == "registry/2.0"
        head = client.head(f"/v2/{repo}/manifests/{ref}", headers=PODMAN_ACCEPT)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["docker-content-digest"] == info.manifest_digest
        assert head.headers["content-type"] == info.media_type
        assert int(head.headers["content-length"]) == len(info.manifest)
    # Every platform manifest of an index is served by digest, byte for byte.
    for platform in info.platforms.values():
        resp = client.get(f"/v2/{repo}/manifests/{platform.manifest_digest}",
                          headers=PODMAN_ACCEPT)
        assert resp.status_code == 200
        assert resp.content == platform.manifest
        assert resp.headers["content-type"] == platform.media_type
        assert resp.headers["docker-content-digest"] == platform.manifest_digest


@pytest.mark.parametrize(("image", "accept"), [
    ("library/multi:1.0", [DOCKER_MANIFEST]),
    ("library/ocimulti:1.0", [OCI_MANIFEST]),
    ("library/multi:1.0", [DOCKER_MANIFEST, OCI_MANIFEST]),
    ("library/ocimulti:1.0", [f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"]),
])
def test_client_without_index_support_gets_linux_amd64(
    client: httpx.Client, seeded_upstream: SeededUpstream, image: str, accept: list[str]
) -> None:
    info = seeded_upstream.images[image]
    amd64 = info.platforms["linux/amd64"]
    repo, _, tag = image.rpartition(":")
    for method in ("GET", "HEAD"):
        resp = client.request(method, f"/v2/{repo}/manifests/{tag}",
                              headers=[("Accept", a) for a in accept])
        assert resp.status_code == 200, resp.text
        assert resp.headers["docker-content-digest"] == amd64.manifest_digest
        assert resp.headers["content-type"] == amd64.media_type
        assert int(resp.headers["content-length"]) == len(amd64.manifest)
        if method == "GET":
            assert resp.content == amd64.manifest


@pytest.mark.parametrize("accept", [
    [("Accept", DOCKER_LIST)],
    [("Accept", OCI_INDEX)],
    [("Accept", "*/*")],
    [],
    [("Accept", f"{DOCKER_MANIFEST};q=0.5, {DOCKER_LIST}")],
    [("Accept", "text/html")],
])
def test_index_served_as_stored_when_acceptable(
    client: httpx.Client, seeded_upstream: SeededUpstream, accept: list[tuple[str, str]]
) -> None:
    info = seeded_upstream.images["library/multi:1.0"]
    resp = client.get("/v2/library/multi/manifests/1.0", headers=accept)
    assert resp.status_code == 200
    assert resp.content == info.manifest
    assert resp.headers["docker-content-digest"] == info.manifest_digest


def test_accept_q_zero_excludes_the_index(
    client: httpx.Client, seeded_upstream: SeededUpstream
) -> None:
    info = seeded_upstream.images["library/multi:1.0"]
    resp = client.get("/v2/library/multi/manifests/1.0",
                      headers=[("Accept", DOCKER_MANIFEST), ("Accept", f"{DOCKER_LIST};q=0")])
    assert resp.status_code == 200
    assert resp.headers["docker-content-digest"] == info.platforms["linux/amd64"].manifest_digest


def test_accept_with_1000_entries(client: httpx.Client, seeded_upstream: SeededUpstream) -> None:
    info = seeded_upstream.images["library/multi:1.0"]
    junk = [f"application/x-junk-{i}+json" for i in range(998)]
    # The index type is the last of 1000 entries: it still counts.
    one_line = ", ".join([*junk, DOCKER_MANIFEST, DOCKER_LIST])
    resp = client.get("/v2/library/multi/manifests/1.0", headers=[("Accept", one_line)])
    assert resp.status_code == 200
    assert resp.headers["docker-content-digest"] == info.manifest_digest
    lines = [("Accept", t) for t in [*junk, DOCKER_MANIFEST, DOCKER_LIST]]
    resp = client.get("/v2/library/multi/manifests/1.0", headers=lines)
    assert resp.status_code == 200
    assert resp.headers["docker-content-digest"] == info.manifest_digest
    # Without the index type anywhere, the platform manifest.
    resp = client.get("/v2/library/multi/manifests/1.0", headers=lines[:-1])
    assert resp.status_code == 200
    assert resp.headers["docker-content-digest"] == info.platforms["linux/amd64"].manifest_digest


def test_huge_accept_header(client: httpx.Client, alpine: Any) -> None:
    big = ", ".join(["application/" + "x" * 40] * 1200)  # ~50 KB on one line
    assert len(big) > 50_000
    resp = client.get("/v2/library/alpine/manifests/3.16.2",
                      headers=[("Accept", big), ("Accept", DOCKER_MANIFEST)])
    assert resp.status_code == 200
    assert resp.content == alpine.manifest
    # Larger than the server takes for a request head: a clean 4xx, never a 500.
    huge = "application/" + "y" * 200_000
    status, _, _ = raw_get(client.base_url.port or 0, "/v2/library/alpine/manifests/3.16.2",
                           b"Accept: " + huge.encode())
    assert 400 <= status < 500
    assert_still_serving(client)


@pytest.mark.parametrize("value", [
    ";;;,,,", ",", ";q=1", "application/", "*/*;q=abc", "application/json;;q", "\t",
    'a/b; x="unterminated', "application/vnd.docker.distribution.manifest.v2+json;q=-1",
    "\u00e9t\u00e9/\u00e9t\u00e9", "a\x01b", "\x7f",
])
def test_malformed_accept(client: httpx.Client, alpine: Any, value: str) -> None:
    status, headers, body = raw_get(
        client.base_url.port or 0, "/v2/library/alpine/manifests/3.16.2",
        b"Accept: " + value.encode("utf-8"))
    assert status == 200 or 400 <= status < 500, (status, body)
    if status == 200:
        assert body == alpine.manifest
        assert headers["docker-content-digest"] == alpine.manifest_digest


def test_manifest_of_another_repository_is_not_served(
    client: httpx.Client, alpine: Any
) -> None:
    # A real manifest digest, but of another repository: the log does not vouch for it here.
    resp = client.get(f"/v2/library/ociimage/manifests/{alpine.manifest_digest}",
                      headers=PODMAN_ACCEPT)
    assert_error(resp, 404, "MANIFEST_UNKNOWN")


# -- blobs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer(client: httpx.Client, alpine: Any) -> tuple[str, bytes]:
    digest = alpine.layer_digests[0]
    resp = client.get(f"/v2/library/alpine/blobs/{digest}")
    assert resp.status_code == 200
    return digest, resp.content


def test_blob_get_and_head(client: httpx.Client, alpine: Any, layer: tuple[str, bytes],
                           seeded_upstream: SeededUpstream) -> None:
    for digest in (*alpine.layer_digests, alpine.config_digest):
        resp = client.get(f"/v2/library/alpine/blobs/{digest}")
        assert resp.status_code == 200
        assert sha256(resp.content) == digest
        assert resp.headers["docker-content-digest"] == digest
        assert int(resp.headers["content-length"]) == len(resp.content)
        head = client.head(f"/v2/library/alpine/blobs/{digest}")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(resp.content)
        assert head.headers["docker-content-digest"] == digest
    upstream = httpx.get(f"{seeded_upstream.url}/v2/library/alpine/blobs/{layer[0]}")
    assert upstream.content == layer[1]


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=0-9", 0, 9),
    ("bytes=-5", -5, None),
    ("bytes=10-", 10, None),
    ("bytes=3-3", 3, 3),
])
def test_blob_range(
    client: httpx.Client, layer: tuple[str, bytes], header: str, start: int, end: int | None
) -> None:
    digest, data = layer
    size = len(data)
    first = start % size
    last = size - 1 if end is None else end
    for method in ("GET", "HEAD"):
        resp = client.request(method, f"/v2/library/alpine/blobs/{digest}",
                              headers={"Range": header})
        assert resp.status_code == 206
        assert resp.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert int(resp.headers["content-length"]) == last - first + 1
        if method == "GET":
            assert resp.content == data[first:last + 1]
        else:
            assert resp.content == b""


@pytest.mark.parametrize("header", ["bytes=999999999-", "bytes=999999999-1000000000"])
def test_blob_range_past_the_end(client: httpx.Client, layer: tuple[str, bytes],
                                 header: str) -> None:
    digest, data = layer
    resp = client.get(f"/v2/library/alpine/blobs/{digest}", headers={"Range": header})
    assert resp.status_code == 416
    assert resp.headers["content-range"] == f"bytes */{len(data)}"
    assert int(resp.headers["content-length"]) == len(resp.content)


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=5-2", "items=0-1", "bytes=abc",
                                    "bytes=0-99999999999"])
def test_blob_range_multi_or_odd_gives_whole_blob(
    client: httpx.Client, layer: tuple[str, bytes], header: str
) -> None:
    digest, data = layer
    resp = client.get(f"/v2/library/alpine/blobs/{digest}", headers={"Range": header})
    if resp.status_code == 206:  # a server may honour an over-long range as the whole blob
        assert resp.headers["content-range"] == f"bytes 0-{len(data) - 1}/{len(data)}"
    else:
        assert resp.status_code == 200
    assert resp.content == data


def test_blob_of_another_repository_is_not_served(
    client: httpx.Client, seeded_upstream: SeededUpstream, layer: tuple[str, bytes]
) -> None:
    # The node has this blob, but its log vouches for it in library/alpine only.
    resp = client.get(f"/v2/library/ociimage/blobs/{layer[0]}")
    assert_error(resp, 404, "BLOB_UNKNOWN")
    resp = client.head(f"/v2/library/ociimage/blobs/{layer[0]}")
    assert resp.status_code == 404 and resp.content == b""


def test_unknown_blob(client: httpx.Client, alpine: Any) -> None:
    err = assert_error(client.get(f"/v2/library/alpine/blobs/{ZERO}"), 404, "BLOB_UNKNOWN")
    assert err["detail"] == {"digest": ZERO}
    assert client.head(f"/v2/library/alpine/blobs/{ZERO}").status_code == 404


# -- tags/list --------------------------------------------------------------------------------


def test_tags_list(client: httpx.Client, alpine: Any) -> None:
    resp = client.get("/v2/library/alpine/tags/list")
    assert resp.status_code == 200
    assert resp.json() == {"name": "library/alpine", "tags": ["3.16.2"]}
    assert "link" not in resp.headers
    assert_error(client.get("/v2/library/nosuchrepo/tags/list"), 404, "NAME_UNKNOWN")
    assert_error(client.get("/v2/library/alpine/tags/list?n=x"), 400, "PAGINATION_NUMBER_INVALID")


def test_tags_list_pagination(tmp_path: Path, upstream_registry: UpstreamRegistry) -> None:
    tags = ["1.0", "1.1", "2.0", "latest", "v3"]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_digest = upload_blob(upstream_registry, "team/app", config)
    for i, tag in enumerate(tags):
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "size": len(config), "digest": config_digest},
            "layers": [], "annotations": {"i": str(i)},
        }).encode()
        put_manifest(upstream_registry, "team/app", tag, manifest, DOCKER_MANIFEST)
    with NodeProcess(tmp_path / "node", upstream=upstream_registry.url) as n, \
            httpx.Client(base_url=n.url, timeout=30) as c:
        for tag in tags:
            assert c.get(f"/v2/team/app/manifests/{tag}").status_code == 200
            wait_committed(c, f"team/app:{tag}")
        assert c.get("/v2/team/app/tags/list").json() == {"name": "team/app", "tags": tags}
        resp = c.get("/v2/team/app/tags/list", params={"n": 2})
        assert resp.json()["tags"] == ["1.0", "1.1"]
        assert resp.headers["link"] == '</v2/team/app/tags/list?n=2&last=1.1>; rel="next"'
        resp = c.get("/v2/team/app/tags/list", params={"n": 2, "last": "1.1"})
        assert resp.json()["tags"] == ["2.0", "latest"]
        assert resp.headers["link"] == '</v2/team/app/tags/list?n=2&last=latest>; rel="next"'
        resp = c.get("/v2/team/app/tags/list", params={"n": 2, "last": "latest"})
        assert resp.json()["tags"] == ["v3"]
        assert "link" not in resp.headers
        resp = c.get("/v2/team/app/tags/list", params={"n": 5})
        assert resp.json()["tags"] == tags and "link" not in resp.headers
        resp = c.get("/v2/team/app/tags/list", params={"n": 0})
        assert resp.status_code == 200 and resp.json()["tags"] == []
        resp = c.get("/v2/team/app/tags/list", params={"last": "v3"})
        assert resp.status_code == 200 and resp.json()["tags"] == []
        assert c.head("/v2/team/app/tags/list").status_code == 200


# -- errors -----------------------------------------------------------------------------------


def test_manifest_unknown(client: httpx.Client) -> None:
    start = time.monotonic()
    assert_error(client.get("/v2/library/alpine/manifests/no-such-tag"), 404, "MANIFEST_UNKNOWN")
    assert_error(client.get(f"/v2/library/alpine/manifests/{ZERO}"), 404, "MANIFEST_UNKNOWN")
    assert_error(client.get("/v2/nobody/nothing/manifests/1.0"), 404, "MANIFEST_UNKNOWN")
    head = client.head("/v2/library/alpine/manifests/no-such-tag")
    assert head.status_code == 404 and head.content == b""
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("name", [
    "Library/Alpine", "library/ALPINE", "library/..", "library/../alpine", "-bad", "a//b",
    "a" * 256, "/".join(["abcdefghij"] * 30), "library/al pine", "library/alpine_", ".hidden",
])
def test_name_invalid(client: httpx.Client, name: str) -> None:
    for path in (f"/v2/{name}/manifests/latest", f"/v2/{name}/blobs/{ZERO}",
                 f"/v2/{name}/tags/list"):
        status, _, body = raw_get(client.base_url.port or 0, path.replace(" ", "%20"))
        assert status == 400, (path, status, body)
        assert error_code(body) == "NAME_INVALID"


@pytest.mark.parametrize("target", [
    b"/v2/library/../../etc/passwd/manifests/latest",
    b"/v2/library/../../../../etc/passwd/blobs/" + ZERO.encode(),
    b"/v2/%2e%2e/%2e%2e/etc/passwd/manifests/latest",
    b"/v2/library%2F..%2F..%2Fetc/manifests/latest",
    b"/v2/./alpine/manifests/latest",
])
def test_path_traversal_is_name_invalid(node: NodeProcess, target: bytes) -> None:
    status, _, body = raw_get(node.port, target)
    assert status == 400, (status, body)
    assert error_code(body) == "NAME_INVALID"


@pytest.mark.parametrize("target", [b"/../../etc/passwd", b"/v2/../../etc/passwd",
                                    b"/api/../../etc/passwd"])
def test_path_traversal_outside_v2(node: NodeProcess, target: bytes) -> None:
    status, _, body = raw_get(node.port, target)
    assert status in (400, 404), (status, body)
    assert b"root:" not in body


@pytest.mark.parametrize("digest", [
    "sha256:xyz", "sha256:" + "A" * 64, "sha256:" + "0" * 63, "sha512:" + "0" * 128,
    "md5:" + "0" * 32, "sha256", "sha256:", ":abc", "SHA256:" + "0" * 64, "sha256:" + "0" * 300,
])
def test_digest_invalid(client: httpx.Client, digest: str) -> None:
    assert_error(client.get(f"/v2/library/alpine/blobs/{digest}"), 400, "DIGEST_INVALID")
    assert client.head(f"/v2/library/alpine/blobs/{digest}").status_code == 400
    if ":" in digest:
        assert_error(client.get(f"/v2/library/alpine/manifests/{digest}"), 400, "DIGEST_INVALID")


@pytest.mark.parametrize("reference", ["-tag", "a" * 129, ".x", "t%20ag"])
def test_tag_invalid(client: httpx.Client, reference: str) -> None:
    resp = client.get(f"/v2/library/alpine/manifests/{reference}")
    assert resp.status_code == 400
    assert resp.json()["errors"][0]["code"] in ("TAG_INVALID", "MANIFEST_INVALID")


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v2/x/blobs/uploads/"),
    ("POST", "/v2/library/alpine/blobs/uploads/?mount=" + ZERO + "&from=library/other"),
    ("PATCH", "/v2/x/blobs/uploads/0a0b0c"),
    ("PUT", "/v2/x/blobs/uploads/0a0b0c?digest=" + ZERO),
    ("DELETE", "/v2/x/blobs/uploads/0a0b0c"),
    ("GET", "/v2/x/blobs/uploads/0a0b0c"),
    ("PUT", "/v2/library/alpine/manifests/3.16.2"),
    ("DELETE", "/v2/library/alpine/manifests/3.16.2"),
    ("DELETE", f"/v2/library/alpine/blobs/{ZERO}"),
    ("PUT", "/v2/Bad/Name/manifests/x"),
    ("POST", "/v2/"),
    ("OPTIONS", "/v2/library/alpine/manifests/3.16.2"),
])
def test_push_endpoints_unsupported(client: httpx.Client, method: str, path: str) -> None:
    resp = client.request(method, path, content=b'{"schemaVersion": 2}')
    assert_error(resp, 405, "UNSUPPORTED")


@pytest.mark.parametrize("path", ["/v2/x", "/foo", "/v2/library/alpine/foo/bar",
                                  "/v2/library/alpine/manifests", "/v2/library/alpine/manifests/",
                                  "/v2/library/alpine/blobs/", "/v2/tags/list", "/favicon.ico",
                                  "/v1/_ping", "/api/nothing"])
def test_unknown_route_is_404(client: httpx.Client, path: str) -> None:
    for method in ("GET", "HEAD", "POST"):
        resp = client.request(method, path)
        assert resp.status_code in (404, 405), (method, path, resp.status_code, resp.text)
        if method == "GET":
            assert resp.status_code == 404
            assert resp.headers["content-type"].startswith("application/json")
            resp.json()


# -- the wire ---------------------------------------------------------------------------------


def test_tls_probe_gets_http_400(node: NodeProcess, client: httpx.Client) -> None:
    reply = raw(node.port, client_hello())
    assert reply.startswith(b"HTTP/1."), reply[:100]
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"400"
    # And through a real TLS client: the handshake fails, it does not hang.
    ctx = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock, \
            pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(sock, server_hostname="localhost")
    assert_still_serving(client)


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /nothing HTTP/9.9\r\n\r\n",  # "/" is the status page now: an unknown route
    b"\x00\x01\x02\x03\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /v2/\xff\xfe/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/caf\xc3\xa9/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_garbage_requests_get_4xx(node: NodeProcess, client: httpx.Client,
                                  request_bytes: bytes) -> None:
    reply = raw(node.port, request_bytes, one=True)
    status, _, body = parse_reply(reply)
    assert 400 <= status < 500, (status, body)
    assert_still_serving(client)


def test_oversized_headers(node: NodeProcess, client: httpx.Client) -> None:
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(2000))
    reply = raw(node.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    status, _, _ = parse_reply(reply)
    assert status in (400, 413, 431)
    long_line = b"GET /v2/" + b"a" * 200_000 + b"/manifests/x HTTP/1.1\r\nHost: x\r\n\r\n"
    status, _, _ = parse_reply(raw(node.port, long_line))
    assert 400 <= status < 500
    assert_still_serving(client)


def test_keep_alive_after_errors(node: NodeProcess, alpine: Any) -> None:
    """Error answers keep the connection usable: pipelined requests on one socket."""
    reqs = b"".join(
        b"GET " + t + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        for t in (b"/v2/Bad/manifests/x", f"/v2/library/alpine/blobs/{ZERO}".encode(),
                  b"/nothing", b"/v2/library/alpine/manifests/3.16.2")
    ) + b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = raw(node.port, reqs)
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]
    assert statuses == [400, 404, 404, 200, 200]


# -- builds: concurrency, upstream down ------------------------------------------------------


@pytest.fixture
def fresh_node(tmp_path: Path, fresh_seeded_upstream: SeededUpstream) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path / "node", upstream=fresh_seeded_upstream.url) as n:
        yield n


def test_concurrent_pulls_build_once(fresh_node: NodeProcess,
                                     fresh_seeded_upstream: SeededUpstream) -> None:
    upstream = fresh_seeded_upstream.registry
    info = fresh_seeded_upstream.images["library/alpine:3.16.2"]
    mark = upstream.mark()
    # A blob the upstream has but this node's log does not vouch for: not served, not fetched.
    resp = httpx.get(f"{fresh_node.url}/v2/library/alpine/blobs/{info.layer_digests[0]}")
    assert_error(resp, 404, "BLOB_UNKNOWN")
    assert upstream.requests_since(mark) == []

    def pull(_: int) -> tuple[int, str, bytes]:
        r = httpx.get(f"{fresh_node.url}/v2/library/alpine/manifests/3.16.2",
                      headers=PODMAN_ACCEPT, timeout=60)
        return r.status_code, r.headers.get("docker-content-digest", ""), r.content

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(pull, range(20)))
    assert {(s, d) for s, d, _ in results} == {(200, info.manifest_digest)}
    assert {c for _, _, c in results} == {info.manifest}
    with httpx.Client(base_url=fresh_node.url) as c:
        wait_committed(c, "alpine:3.16.2")
    fetches = upstream.manifest_fetches_since(mark)
    assert [p for _, p, _ in fetches].count("/v2/library/alpine/manifests/3.16.2") == 1, fetches
    assert len(upstream.blob_fetches_since(mark)) == len(info.blob_digests)
    # Now vouched for: served, from the cache.
    mark = upstream.mark()
    resp = httpx.get(f"{fresh_node.url}/v2/library/alpine/blobs/{info.layer_digests[0]}")
    assert resp.status_code == 200 and sha256(resp.content) == info.layer_digests[0]
    assert upstream.requests_since(mark) == []


def test_upstream_down(fresh_node: NodeProcess, fresh_seeded_upstream: SeededUpstream) -> None:
    info = fresh_seeded_upstream.images["library/alpine:3.16.2"]
    with httpx.Client(base_url=fresh_node.url, timeout=30) as c:
        assert c.get("/v2/library/alpine/manifests/3.16.2",
                     headers=PODMAN_ACCEPT).status_code == 200
        for digest in info.blob_digests:
            assert c.get(f"/v2/library/alpine/blobs/{digest}").status_code == 200
        wait_committed(c, "alpine:3.16.2")
        fresh_seeded_upstream.registry.stop()
        start = time.monotonic()
        resp = c.get("/v2/library/multi/manifests/1.0", headers=PODMAN_ACCEPT)
        assert time.monotonic() - start < 10
        assert 400 <= resp.status_code < 600 and resp.status_code != 500, resp.text
        err = resp.json()["errors"][0]
        assert err["code"] in ("UNAVAILABLE", "MANIFEST_UNKNOWN")
        assert "Traceback" not in resp.text
        # What is cached is still served.
        resp = c.get("/v2/library/alpine/manifests/3.16.2", headers=PODMAN_ACCEPT)
        assert resp.status_code == 200 and resp.content == info.manifest
        for digest in info.blob_digests:
            resp = c.get(f"/v2/library/alpine/blobs/{digest}")
            assert resp.status_code == 200 and sha256(resp.content) == digest
    assert "Traceback" not in fresh_node.log()


def test_corrupted_manifest_is_never_served(
    node: NodeProcess, client: httpx.Client, seeded_upstream: SeededUpstream
) -> None:
    info = seeded_upstream.images["some/nested/repo:v1"]
    assert client.get("/v2/some/nested/repo/manifests/v1").content == info.manifest
    wait_committed(client, "some/nested/repo:v1")
    hex_ = info.manifest_digest.removeprefix("sha256:")
    stored = node.data_dir / "blobs" / "sha256" / hex_[:2] / hex_
    assert stored.read_bytes() == info.manifest
    stored.chmod(0o644)
    stored.write_bytes(info.manifest.replace(b"schemaVersion", b"schemaVersiom"))
    for ref in ("v1", info.manifest_digest):
        # The bad copy is dropped and a verified one fetched again: never bad bytes.
        resp = client.get(f"/v2/some/nested/repo/manifests/{ref}", headers=PODMAN_ACCEPT)
        assert resp.status_code == 200, resp.text
        assert resp.content == info.manifest
        assert resp.headers["docker-content-digest"] == info.manifest_digest
    assert "was corrupt and was dropped" in node.log()
