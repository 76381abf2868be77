"""Streamed verification (issue #14, DESIGN §11), the way a user reaches it: real node
processes on 127.0.0.1, a scripted upstream (:class:`support.hostile.HostileUpstream`),
skopeo, podman, curl and httpx as clients.

A blob in flight streams to every client waiting for it, and its end is held back until
its digest checked out: bytes that do not match (one byte changed near the end, or a body
cut short), from the upstream or from a peer, cut every client short before the end, and
nothing of them is stored or logged; the next pull from an honest source works. One fetch
serves every client; a client that goes away stops nothing; the first bytes reach a client
while the rest is still on its way.

One build node ``A`` (its own quorum; its uploads to peers paced, so that a peer fetch
lasts long enough to watch) and one regular node ``B`` (no upstream, ``--peer A``) serve
the whole module; each test uses images of its own.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import pytest
from pyrsia_registry._receiving import HOLD_BACK
from support.clients import podman, podman_cleanup, skopeo, write_registries_conf
from support.hostile import Handler, HostileUpstream
from support.images import OCI_MANIFEST, BuiltImage, build_image, sha256_digest
from support.node import NodeProcess, node_status, run_cli, wait_until

pytestmark = pytest.mark.process

FAST = ("--sync-interval", "0.5")
#: A's uploads to peers: a 3 MiB layer takes ~1.5 s to reach B.
UPLOAD_RATE = "2MB/s"
#: How long the upstream waits before the end of a layer (clients attach meanwhile).
PAUSE = 1.5
#: Layers fetched from the upstream (below the 8 MiB of part lists: one stream, one hash).
UPSTREAM_LAYER = 6 << 20
#: Layers fetched from a peer.
PEER_LAYER = 3 << 20
#: The byte a lying source changes: this far before the end.
FLIP_AT = 10
#: What a source that cuts a layer short leaves out.
SHORT_BY = 1000
CLIENTS = 8

Mode = Literal["honest", "flipped", "short", "dropped"]


# -- the scripted upstream -----------------------------------------------------------------


@dataclass
class Layer:
    """A layer route of the upstream. Each GET sends ``Content-Length: <size>`` and the
    first ``head`` bytes at once, waits ``pause`` s, then the rest: all of it (``honest``),
    all of it with the byte at ``size - FLIP_AT`` changed (``flipped``), all but the last
    :data:`SHORT_BY` bytes before closing the connection (``short``), or nothing more before
    closing it (``dropped``)."""

    upstream: HostileUpstream
    data: bytes
    head: int
    pause: float = PAUSE
    mode: Mode = "honest"
    gets: int = 0
    #: When each GET began its pause, and when it resumed (``time.monotonic``).
    paused: list[float] = field(default_factory=list)
    resumed: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    def __call__(self, h: Handler) -> None:
        mode, pause, size = self.mode, self.pause, len(self.data)
        body = self.data
        if mode == "flipped":
            changed = bytearray(body)
            changed[size - FLIP_AT] ^= 0xFF
            body = bytes(changed)
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(size))
        h.send_header("Docker-Content-Digest", self.digest)
        h.end_headers()
        if h.command == "HEAD":
            return
        with self._lock:
            self.gets += 1
        h.wfile.write(body[: self.head])
        h.wfile.flush()
        self.paused.append(time.monotonic())
        self.upstream.sleep(pause)
        self.resumed.append(time.monotonic())
        end = {"short": size - SHORT_BY, "dropped": self.head}.get(mode, size)
        h.wfile.write(body[self.head : end])
        h.wfile.flush()
        if end < size:
            h.close_connection = True  # the connection closes before Content-Length bytes


@dataclass
class Image:
    repo: str
    tag: str
    built: BuiltImage
    layer: Layer

    @property
    def digests(self) -> set[str]:
        """The manifest, config and layer digests."""
        return {self.built.manifest_digest, self.built.config_digest, self.layer.digest}


def serve_image(upstream: HostileUpstream, repo: str, *, size: int, head: int,
                pause: float = PAUSE, mode: Mode = "honest") -> Image:
    """A valid one-layer OCI image (podman unpacks it) at ``repo:1``, its layer scripted."""
    built = build_image(seed=f"streaming:{repo}", layer_size=size)
    (layer_digest,) = built.layer_digests
    layer = Layer(upstream, built.blobs[layer_digest], head=head, pause=pause, mode=mode)
    upstream.manifest(repo, "1", built.manifest, OCI_MANIFEST)
    upstream.blob(repo, built.blobs[built.config_digest])
    upstream.route(f"/v2/{repo}/blobs/{layer_digest}", layer)
    return Image(repo, "1", built, layer)


# -- clients -------------------------------------------------------------------------------


@dataclass
class Curl:
    """A ``curl`` of a blob, running."""

    proc: subprocess.Popen[str]
    out: Path

    @classmethod
    def start(cls, url: str, out: Path) -> Curl:
        proc = subprocess.Popen(
            ["curl", "-sS", "--max-time", "60", "-o", str(out), "-D", f"{out}.headers",
             "-w", "%{http_code}", url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return cls(proc, out)

    def finish(self) -> CurlResult:
        stdout, stderr = self.proc.communicate(timeout=90)
        headers = Path(f"{self.out}.headers").read_text(errors="replace").lower()
        length = next((int(line.split(":", 1)[1]) for line in headers.splitlines()
                       if line.startswith("content-length:")), None)
        body = self.out.read_bytes() if self.out.exists() else b""
        return CurlResult(self.proc.returncode, int(stdout or 0), length, body, stderr)


@dataclass
class CurlResult:
    exit_code: int
    status: int
    content_length: int | None
    body: bytes
    stderr: str


def curls(url: str, outdir: Path, n: int = CLIENTS) -> list[Curl]:
    outdir.mkdir(parents=True, exist_ok=True)
    return [Curl.start(url, outdir / f"curl{i}") for i in range(n)]


def assert_cut_short(results: list[CurlResult], data: bytes) -> None:
    """Every curl got the blob's headers and some of its true bytes, never its end (the
    last HOLD_BACK bytes, where the bad byte or the missing bytes are)."""
    size = len(data)
    for r in results:
        assert r.status == 200, r
        assert r.content_length == size, r
        assert 0 < len(r.body) <= size - HOLD_BACK, (len(r.body), size, r.stderr)
        assert r.body == data[: len(r.body)]
        assert r.exit_code == 18, r  # "transfer closed with N bytes remaining to read"


def assert_client_failed(out: subprocess.CompletedProcess[str]) -> None:
    """skopeo or podman failed on the layer: cut short (or, had it asked only after the
    abort, told that the blob is unknown)."""
    assert out.returncode != 0, out.stdout
    assert "unexpected EOF" in out.stderr or "blob unknown" in out.stderr, out.stderr


def skopeo_copy(node: NodeProcess, image: Image, dest: Path) -> subprocess.CompletedProcess[str]:
    return skopeo("copy", "--src-tls-verify=false",
                  f"docker://127.0.0.1:{node.port}/{image.repo}:{image.tag}", f"dir:{dest}",
                  timeout=90, check=False)


def copied_digests(dest: Path) -> set[str]:
    return {sha256_digest(p.read_bytes()) for p in dest.iterdir() if p.name != "version"}


def podman_pull(node: NodeProcess, image: Image, tmpdir: Path
                ) -> subprocess.CompletedProcess[str]:
    conf = write_registries_conf(tmpdir / "registries.conf", [f"127.0.0.1:{node.port}"])
    return podman(tmpdir, "pull", f"docker.io/{image.repo}:{image.tag}",
                  registries_conf=conf, timeout=120, check=False)


def stream_part(url: str, limit: int, started: threading.Event | None = None) -> int:
    """GET ``url`` as a stream, read at least ``limit`` bytes of the body, then close the
    connection (a client that goes away halfway); the bytes read."""
    got = 0
    with httpx.Client(timeout=60) as client, client.stream("GET", url) as resp:
        assert resp.status_code == 200, resp.status_code
        for chunk in resp.iter_raw():
            got += len(chunk)
            if started is not None:
                started.set()
            if got >= limit:
                break
    return got


def stream_all(url: str) -> tuple[bytes, float, float]:
    """GET ``url`` as a stream: the body, when its first bytes came and when it ended."""
    first: float | None = None
    chunks: list[bytes] = []
    with httpx.Client(timeout=60) as client, client.stream("GET", url) as resp:
        assert resp.status_code == 200, resp.status_code
        for chunk in resp.iter_raw():
            if first is None and chunk:
                first = time.monotonic()
            chunks.append(chunk)
    assert first is not None
    return b"".join(chunks), first, time.monotonic()


# -- what a node keeps -----------------------------------------------------------------------


def blob_file(node: NodeProcess, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    return node.data_dir / "blobs" / "sha256" / hex_[:2] / hex_


def partial_files(node: NodeProcess) -> list[Path]:
    return sorted((node.data_dir / "partial").glob("recv-*"))


def builds_failed(node: NodeProcess, image: Image) -> int:
    return node.log().count(f"Build of {image.repo}:{image.tag} failed")


def inspect_log(tmp_path: Path, node: NodeProcess, image: Image
                ) -> subprocess.CompletedProcess[str]:
    return run_cli(tmp_path, "inspect-log", "docker", "--image", f"{image.repo}:{image.tag}",
                   port=node.port)


def no_partial_files(node: NodeProcess) -> None:
    """No ``recv-*`` file is left once the fetches in flight ended (a prefetch of the
    image's other blobs may still be running a moment after a client's pull)."""
    wait_until("no partial file left", lambda: partial_files(node) == [], timeout=10)


def assert_nothing_kept(tmp_path: Path, node: NodeProcess, image: Image) -> None:
    """No blob of ``image`` stored, no partial file left, no log record of it."""
    for digest in image.digests:
        assert not blob_file(node, digest).exists(), digest
    no_partial_files(node)
    out = inspect_log(tmp_path, node, image)
    assert out.returncode != 0, out.stdout
    resp = node.get("/api/inspect-log/docker", params={"image": f"{image.repo}:{image.tag}"})
    assert resp.status_code == 404, resp.text


def manifest(node: NodeProcess, image: Image) -> httpx.Response:
    return node.get(f"/v2/{image.repo}/manifests/{image.tag}",
                    headers={"Accept": OCI_MANIFEST})


def blob_url(node: NodeProcess, image: Image) -> str:
    return f"{node.url}/v2/{image.repo}/blobs/{image.layer.digest}"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[HostileUpstream]:
    with HostileUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def node_a(tmp_path_factory: pytest.TempPathFactory, upstream: HostileUpstream
           ) -> Iterator[NodeProcess]:
    """The build node (its own quorum), pulling from the scripted upstream."""
    with NodeProcess(tmp_path_factory.mktemp("a"), upstream=upstream.url,
                     extra=(*FAST, "--max-upload-rate", UPLOAD_RATE)) as node:
        yield node
        assert "Traceback" not in node.log()


@pytest.fixture(scope="module")
def node_b(tmp_path_factory: pytest.TempPathFactory, node_a: NodeProcess
           ) -> Iterator[NodeProcess]:
    """A regular node of A's network without an upstream: its blobs come from peers."""
    with NodeProcess(tmp_path_factory.mktemp("b"), upstream=None,
                     extra=(*FAST, "--peer", node_a.url)) as node:
        yield node
        assert "Traceback" not in node.log()


@pytest.fixture
def podman_tmp(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "podman"
    path.mkdir()
    yield path
    podman_cleanup(path)


def _synced(b: NodeProcess, a: NodeProcess) -> bool:
    return node_status(b)["ledger_head"] == node_status(a)["ledger_head"]


def build_on_a(a: NodeProcess, b: NodeProcess, image: Image, tmp_path: Path) -> None:
    """A builds ``image`` (an honest pull through A) and B has the block."""
    done = skopeo_copy(a, image, tmp_path / f"via-a-{image.repo.replace('/', '_')}")
    assert done.returncode == 0, done.stderr
    wait_until("B to sync A's log", lambda: _synced(b, a), timeout=30)


# -- 1: the upstream sends a bad layer ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["flipped", "short"])
def test_bad_layer_from_the_upstream_cuts_every_client_short(
    mode: Mode, tmp_path: Path, upstream: HostileUpstream, node_a: NodeProcess,
    podman_tmp: Path,
) -> None:
    """The upstream sends most of a 6 MiB layer at once, pauses, then one byte changed
    near its end (or closes the connection 1000 bytes early): skopeo, podman and 8 curls
    waiting on that layer all fail before its end; nothing is stored or logged. The next
    pull, once the upstream is honest, works."""
    image = serve_image(upstream, f"evil/{mode}", size=UPSTREAM_LAYER,
                        head=UPSTREAM_LAYER - (1 << 20), mode=mode)
    before = node_status(node_a)
    assert manifest(node_a, image).status_code == 200  # the build runs
    with ThreadPoolExecutor(2) as pool:
        sk = pool.submit(skopeo_copy, node_a, image, tmp_path / "skopeo")
        pm = pool.submit(podman_pull, node_a, image, podman_tmp)
        wait_until("the upstream to pause in the layer", lambda: image.layer.paused,
                   timeout=30)
        running = curls(blob_url(node_a, image), tmp_path / "curl")
        results = [c.finish() for c in running]
        skopeo_out, podman_out = sk.result(), pm.result()
    assert_cut_short(results, image.layer.data)
    assert_client_failed(skopeo_out)
    assert_client_failed(podman_out)
    # Every build that fetched the bad layer failed (podman retries: a build each).
    wait_until("the builds to end", lambda: builds_failed(node_a, image) == image.layer.gets,
               timeout=30)
    assert_nothing_kept(tmp_path, node_a, image)
    after = node_status(node_a)
    assert after["log_records"] == before["log_records"]
    assert after["artifact_count"] == before["artifact_count"]
    log = node_a.log()
    if mode == "flipped":
        assert f"the bytes received for {image.layer.digest} do not match it" in log
    assert "Cut short GET" in log

    # The upstream serves the right bytes again: the next pulls work.
    image.layer.mode, image.layer.pause = "honest", 0.0
    gets = image.layer.gets
    done = skopeo_copy(node_a, image, tmp_path / "skopeo-honest")
    assert done.returncode == 0, done.stderr
    assert copied_digests(tmp_path / "skopeo-honest") == image.digests
    assert image.layer.gets == gets + 1
    pulled = podman_pull(node_a, image, podman_tmp)
    assert pulled.returncode == 0, pulled.stderr
    assert blob_file(node_a, image.layer.digest).read_bytes() == image.layer.data
    no_partial_files(node_a)
    records = json.loads(inspect_log(tmp_path, node_a, image).stdout)
    assert image.layer.digest.removeprefix("sha256:") in {r["artifact_hash"] for r in records}


def test_abort_before_the_first_byte_is_a_404_with_the_reason(
    tmp_path: Path, upstream: HostileUpstream, node_a: NodeProcess
) -> None:
    """The upstream sends 512 KiB of a layer, pauses, and closes the connection: no byte
    of it was ever released, so every client waiting on it gets a 404 BLOB_UNKNOWN that
    says why, instead of a response cut short; nothing is stored or logged."""
    image = serve_image(upstream, "evil/dropped", size=UPSTREAM_LAYER, head=512 << 10,
                        mode="dropped")
    assert manifest(node_a, image).status_code == 200
    wait_until("the upstream to pause in the layer", lambda: image.layer.paused, timeout=30)
    running = curls(blob_url(node_a, image), tmp_path / "curl")
    results = [c.finish() for c in running]
    for r in results:
        assert (r.exit_code, r.status) == (0, 404), r
        error = json.loads(r.body)["errors"][0]
        assert error["code"] == "BLOB_UNKNOWN", error
        assert f"{image.layer.digest} could not be fetched" in error["message"], error
        assert "peer closed connection" in error["message"], error
    wait_until("the build to end", lambda: builds_failed(node_a, image) == 1, timeout=30)
    assert_nothing_kept(tmp_path, node_a, image)


# -- 3: many clients, one fetch -------------------------------------------------------------


def test_eight_clients_get_one_upstream_fetch(
    tmp_path: Path, upstream: HostileUpstream, node_a: NodeProcess
) -> None:
    """8 curls waiting on a layer while the build fetches it: all get identical, correct
    bytes, and the upstream was asked for the layer once."""
    image = serve_image(upstream, "ok/eight", size=UPSTREAM_LAYER, head=UPSTREAM_LAYER // 2)
    assert manifest(node_a, image).status_code == 200
    started = time.monotonic()
    running = curls(blob_url(node_a, image), tmp_path / "curl")
    results = [c.finish() for c in running]
    for r in results:
        assert (r.exit_code, r.status) == (0, 200), r
        assert r.body == image.layer.data
    assert image.layer.gets == 1
    assert upstream.count(f"/v2/{image.repo}/blobs/{image.layer.digest}") == 1
    (resumed,) = image.layer.resumed
    assert started < resumed  # all 8 asked while the layer was still on its way


# -- 4: a client that goes away ---------------------------------------------------------------


def test_client_leaving_halfway_stops_nothing_upstream(
    tmp_path: Path, upstream: HostileUpstream, node_a: NodeProcess
) -> None:
    """Two clients on a layer in flight; one reads 1 MiB and closes its connection: the
    other gets the whole layer, the layer is fetched once and stored once, no partial
    file stays."""
    image = serve_image(upstream, "ok/leaver", size=UPSTREAM_LAYER, head=UPSTREAM_LAYER // 2)
    assert manifest(node_a, image).status_code == 200
    url = blob_url(node_a, image)
    with ThreadPoolExecutor(2) as pool:
        leaver = pool.submit(stream_part, url, 1 << 20)
        stayer = pool.submit(stream_all, url)
        read = leaver.result()
        assert not image.layer.resumed, "the leaver should be gone before the pause ends"
        body, _, _ = stayer.result()
    assert (1 << 20) <= read < len(image.layer.data)
    assert body == image.layer.data
    assert image.layer.gets == 1
    wait_until("the layer to be stored",
               lambda: blob_file(node_a, image.layer.digest).exists(), timeout=10)
    assert blob_file(node_a, image.layer.digest).read_bytes() == image.layer.data
    no_partial_files(node_a)


# -- 5: streaming is real ----------------------------------------------------------------------


def test_first_bytes_reach_the_client_before_the_upstream_sent_the_rest(
    upstream: HostileUpstream, node_a: NodeProcess
) -> None:
    """The upstream sends half the layer, pauses 2 s, then the rest: a client has the first
    bytes before the pause ends, and the whole layer after it."""
    image = serve_image(upstream, "ok/stream", size=UPSTREAM_LAYER, head=UPSTREAM_LAYER // 2,
                        pause=2.0)
    assert manifest(node_a, image).status_code == 200
    asked = time.monotonic()
    body, first, last = stream_all(blob_url(node_a, image))
    assert body == image.layer.data
    (resumed,) = image.layer.resumed
    assert first < resumed, f"first byte {first - resumed:.2f} s after the pause ended"
    assert first - asked < 2.0
    assert last >= resumed


# -- 2: a peer sends bad bytes -------------------------------------------------------------------


def test_bad_bytes_from_a_peer_cut_every_client_short(
    tmp_path: Path, upstream: HostileUpstream, node_a: NodeProcess, node_b: NodeProcess,
    podman_tmp: Path,
) -> None:
    """A built an image; then its stored layer gets one byte changed near the end (same
    size: A serves it to peers as it is). Clients pulling through B -- skopeo, podman, 8
    curls -- all fail before the end; B stores nothing and blames A. Once A's copy is
    quarantined and fetched again, the next pull through B works, one peer fetch for all."""
    image = serve_image(upstream, "peer/flipped", size=PEER_LAYER, head=PEER_LAYER, pause=0)
    build_on_a(node_a, node_b, image, tmp_path)
    size = len(image.layer.data)
    stored = blob_file(node_a, image.layer.digest)
    stored.chmod(0o644)
    damaged = bytearray(stored.read_bytes())
    damaged[size - FLIP_AT] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    before = node_status(node_b)
    assert manifest(node_b, image).status_code == 200
    with ThreadPoolExecutor(2) as pool:
        running = curls(blob_url(node_b, image), tmp_path / "curl")
        sk = pool.submit(skopeo_copy, node_b, image, tmp_path / "skopeo")
        pm = pool.submit(podman_pull, node_b, image, podman_tmp)
        results = [c.finish() for c in running]
        skopeo_out, podman_out = sk.result(), pm.result()
    assert_cut_short(results, image.layer.data)
    assert_client_failed(skopeo_out)
    assert_client_failed(podman_out)
    a_id = node_status(node_a)["node_id"]
    wait_until("B to give up on the bad copy",
               lambda: f"Peers could not provide {image.repo}" in node_b.log()
               and not partial_files(node_b), timeout=30)
    assert not blob_file(node_b, image.layer.digest).exists()
    log = node_b.log()
    assert f"Peer {a_id[:16]} misbehaved: sent bytes for {image.layer.digest}" in log
    assert f"Blob {image.layer.digest} pulled from peer" not in log
    after = node_status(node_b)
    assert after["log_records"] == before["log_records"] == node_status(node_a)["log_records"]

    # A's copy is found damaged and fetched again from the (honest) upstream.
    reply = httpx.post(f"{node_a.url}/api/cache/verify", json={"digest": image.layer.digest},
                       timeout=30)
    assert reply.status_code == 200 and reply.json()["stored"] is False, reply.text
    quarantined = node_a.data_dir / "blobs" / "quarantine" / image.layer.digest[7:]
    assert quarantined.read_bytes() == bytes(damaged)
    resp = node_a.get(f"/v2/{image.repo}/blobs/{image.layer.digest}")
    assert resp.status_code == 200 and resp.content == image.layer.data
    # The next pulls through B work: 8 curls and skopeo, from one peer fetch.
    running = curls(blob_url(node_b, image), tmp_path / "curl-honest")
    done = skopeo_copy(node_b, image, tmp_path / "skopeo-honest")
    results = [c.finish() for c in running]
    for r in results:
        assert (r.exit_code, r.status) == (0, 200), r
        assert r.body == image.layer.data
    assert done.returncode == 0, done.stderr
    assert copied_digests(tmp_path / "skopeo-honest") == image.digests
    # The clients had it once it verified; B logs the fetch once its store has it.
    wait_until("B to log its fetch", lambda: f"Blob {image.layer.digest} pulled from peer"
               in node_b.log(), timeout=10)
    assert node_b.log().count(f"Blob {image.layer.digest} pulled from peer") == 1
    assert blob_file(node_b, image.layer.digest).read_bytes() == image.layer.data
    no_partial_files(node_b)


def test_peer_fetch_outlives_the_client_that_started_it(
    tmp_path: Path, upstream: HostileUpstream, node_a: NodeProcess, node_b: NodeProcess
) -> None:
    """The client whose request started B's fetch from A reads 1 MiB and goes away; a
    second client gets the whole layer, from that same fetch, and B stores it once."""
    image = serve_image(upstream, "peer/leaver", size=PEER_LAYER, head=PEER_LAYER, pause=0)
    build_on_a(node_a, node_b, image, tmp_path)
    assert manifest(node_b, image).status_code == 200
    url = blob_url(node_b, image)
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        leaver: Future[int] = pool.submit(stream_part, url, 1 << 20, started)
        assert started.wait(30)
        stayer = pool.submit(stream_all, url)
        read = leaver.result()
        # Gone while the fetch still runs (A paces it: ~1.5 s).
        assert not blob_file(node_b, image.layer.digest).exists()
        assert partial_files(node_b)
        body, _, _ = stayer.result()
    assert (1 << 20) <= read < len(image.layer.data)
    assert body == image.layer.data
    wait_until("B to store the layer and log its fetch",
               lambda: f"Blob {image.layer.digest} pulled from peer" in node_b.log(),
               timeout=10)
    assert blob_file(node_b, image.layer.digest).exists()
    assert node_b.log().count(f"Blob {image.layer.digest} pulled from peer") == 1
    assert hashlib.sha256(blob_file(node_b, image.layer.digest).read_bytes()).hexdigest() \
        == image.layer.digest.removeprefix("sha256:")
    no_partial_files(node_b)



def test_a_regular_node_prefetches_an_image_from_peers_once_its_manifest_is_asked(
    tmp_path: Path, upstream: HostileUpstream, node_a: NodeProcess, node_b: NodeProcess
) -> None:
    """B serves a manifest from the log: the image's blobs start coming from A at once
    (one at a time), before any client asks for them; a client then gets them from B's
    cache."""
    image = serve_image(upstream, "peer/prefetch", size=256 << 10, head=256 << 10, pause=0)
    build_on_a(node_a, node_b, image, tmp_path)
    blobs = (image.built.config_digest, image.layer.digest)
    assert not any(blob_file(node_b, d).exists() for d in blobs)
    assert manifest(node_b, image).status_code == 200  # and nothing else is asked of B
    wait_until("B to prefetch the image's blobs from A",
               lambda: all(blob_file(node_b, d).exists() for d in blobs), timeout=20)
    for digest in blobs:
        assert hashlib.sha256(blob_file(node_b, digest).read_bytes()).hexdigest() \
            == digest.removeprefix("sha256:")
    log = node_b.log()
    assert f"Blob {image.layer.digest} pulled from peer" in log
    resp = httpx.get(blob_url(node_b, image), timeout=30)
    assert resp.status_code == 200 and resp.content == image.layer.data
    assert f"Blob {image.layer.digest} of peer/prefetch served from cache" in node_b.log()
