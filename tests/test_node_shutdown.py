"""SIGTERM (systemd's stop, Kubernetes' termination): a node lets in-flight pulls finish or
cuts them cleanly within a bound, closes its stores and exits 0; its data dir reopens."""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from support.images import make_image_layout, push
from support.node import NodeProcess
from support.registry import UpstreamRegistry

pytestmark = pytest.mark.process
MB = 1024 * 1024
#: The server's drain bound (Server.shutdown_timeout) plus closing the stores and exit.
STOP_BOUND = 10.0 + 5.0
LAYER_SIZE = 24 * MB


@dataclass
class Big:
    upstream: UpstreamRegistry
    digest: str
    size: int
    sha256: str = ""


@pytest.fixture
def big(tmp_path: Path) -> Iterator[Big]:
    with UpstreamRegistry(tmp_path / "up") as reg:
        layout = make_image_layout(tmp_path / "layout", seed="shutdown", layers=1,
                                   layer_size=LAYER_SIZE, tag="1.0")
        push(layout, reg, "library/big", "1.0", format="v2s2", src_tag="1.0")
        layer = httpx.get(f"{reg.url}/v2/library/big/manifests/1.0", headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json"}).json()["layers"][0]
        yield Big(reg, layer["digest"], layer["size"])


@dataclass
class SlowClient:
    """GET a blob over a raw socket with a small receive buffer, at ``rate`` bytes/s."""

    port: int
    path: str
    rate: float
    received: int = 0
    body: bytearray = field(default_factory=bytearray)
    started: threading.Event = field(default_factory=threading.Event)
    error: str = ""
    length: int | None = None

    def run(self) -> None:
        try:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.connect(("127.0.0.1", self.port))
                sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(4096)
                head, _, rest = data.partition(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        self.length = int(line.split(b":")[1])
                self.body += rest
                self.started.set()
                t0 = time.monotonic()
                while self.length is None or len(self.body) < self.length:
                    chunk = sock.recv(32 * 1024)
                    if not chunk:
                        break
                    self.body += chunk
                    ahead = len(self.body) / self.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError as exc:
            self.error = str(exc)
        finally:
            self.started.set()


def _stop_during(node: NodeProcess, client: SlowClient) -> tuple[int, float]:
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    assert client.started.wait(30)
    time.sleep(0.5)
    assert node.proc is not None
    t = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    code = node.proc.wait(STOP_BOUND + 10)
    took = time.monotonic() - t
    thread.join(60)
    return code, took


def test_sigterm_lets_a_pull_finish_then_exits_0_and_reopens(tmp_path: Path, big: Big) -> None:
    node = NodeProcess(tmp_path / "n", upstream=big.upstream.url).start()
    try:
        blob = f"/v2/library/big/blobs/{big.digest}"
        assert httpx.get(node.url + "/v2/library/big/manifests/1.0", timeout=120).is_success
        whole = httpx.get(node.url + blob, timeout=120)
        assert whole.status_code == 200 and len(whole.content) == big.size
        # ~4 s for the whole blob, well inside the drain bound: it must arrive whole.
        client = SlowClient(node.port, blob, rate=big.size / 4)
        code, took = _stop_during(node, client)
        assert code == 0, node.log()[-3000:]
        assert took < STOP_BOUND
        assert client.length == big.size and len(client.body) == big.size, client.error
        assert "sha256:" + hashlib.sha256(client.body).hexdigest() == big.digest
        log = node.log()
        assert "Received SIGTERM" in log and "Traceback" not in log
    finally:
        node.stop()
    # The data dir reopens: the next start serves the same image, from its cache.
    mark = big.upstream.mark()
    with NodeProcess(tmp_path / "n", upstream=big.upstream.url) as again:
        assert httpx.get(again.url + "/v2/library/big/manifests/1.0", timeout=60).is_success
        resp = httpx.get(again.url + f"/v2/library/big/blobs/{big.digest}", timeout=60)
        assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == big.digest
        assert big.upstream.requests_since(mark) == []
    assert "Traceback" not in again.log()


def test_sigterm_cuts_a_too_slow_pull_within_the_bound(tmp_path: Path, big: Big) -> None:
    with NodeProcess(tmp_path / "n", upstream=big.upstream.url) as node:
        blob = f"/v2/library/big/blobs/{big.digest}"
        assert httpx.get(node.url + "/v2/library/big/manifests/1.0", timeout=120).is_success
        # ~60 s for the blob: the node must not wait for it.
        client = SlowClient(node.port, blob, rate=big.size / 60)
        code, took = _stop_during(node, client)
        assert code == 0, node.log()[-3000:]
        assert 9.0 < took < STOP_BOUND  # it waited for the pull, but no longer than the bound
        # The client saw the connection end short of the announced length: it cannot take
        # the blob for complete.
        assert client.length == big.size and len(client.body) < big.size
        assert "Traceback" not in node.log()
    with NodeProcess(tmp_path / "n", upstream=big.upstream.url) as again:
        resp = httpx.get(again.url + f"/v2/library/big/blobs/{big.digest}", timeout=60)
        assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == big.digest


def test_sigterm_while_waiting_for_peers_exits_0(tmp_path: Path) -> None:
    import subprocess
    import sys

    from support.net import free_port

    closed = free_port()  # nobody listens: the node keeps waiting for its peer
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyrsia_cli", "node", "start", "-p", str(free_port()),
             "--no-upstream", "--data-dir", str(tmp_path / "d"), "--peer",
             f"http://127.0.0.1:{closed}"], stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while "Waiting for a peer" not in log.read_text():
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.1)
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 0 and time.monotonic() - t < 5
    text = log.read_text()
    assert "Received SIGTERM, stopping node (still starting)" in text
    assert "Traceback" not in text
