"""A hostile peer on 127.0.0.1, for process tests and ``bench/bench_attack.py``.

Everything here is bounded (counts given by the caller, sockets closed by ``stop``) and
talks to loopback only. The attacker has keys of its own (anyone can make one):

* :class:`Tarpit` -- a TCP server that accepts, counts requests, and never answers.
* :class:`SlowClients` -- many connections to a node's port, each holding a ``/p2p/rpc``
  request open by sending its body a byte at a time.
* :func:`fake_providers`, :func:`far_ahead_blocks`, :func:`ping_flood` -- signed frames
  announcing a tarpit as a provider, far-ahead blocks naming it, claims of addresses.
* :func:`pull` -- a client pull of an image (manifest and blobs, each digest checked).
"""

from __future__ import annotations

import hashlib
import json
import selectors
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import attrs
import httpx
from pyrsia_core._wire import open_frame, seal

from pyrsia_core import (
    CommittedBlock,
    Ed25519Signer,
    Ledger,
    Record,
    SignedRecord,
    block_checkpoint,
    sign_checkpoint,
)

__all__ = [
    "SlowClients", "Tarpit", "fake_providers", "far_ahead_blocks", "image_digests", "ping_flood",
    "pull",
]

ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


class Tarpit:
    """Accepts TCP connections on 127.0.0.1 and never answers; counts the requests."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self._server.setblocking(False)
        self.port = self._server.getsockname()[1]
        self.requests = 0
        self.connections = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._server, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in sel.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._server:
                    try:
                        conn, _ = self._server.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    self.connections += 1
                    self._conns.append(conn)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    sock.close()
                    continue
                self.requests += data.count(b" HTTP/1.1\r\n")
        sel.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._conns:
            conn.close()
        self._server.close()


class SlowClients:
    """``count`` connections to ``port``, each a ``POST /p2p/rpc`` whose body (announced as
    1 MB) arrives one byte every ``interval`` seconds per connection, until :meth:`stop`."""

    def __init__(self, port: int, count: int, interval: float = 1.0) -> None:
        self.port = port
        self.count = count
        self.interval = interval
        self.socks: list[socket.socket] = []
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SlowClients:
        head = (b"POST /p2p/rpc HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n")
        for _ in range(self.count):
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.sendall(head + b"{")
            except OSError:
                continue
            sock.setblocking(False)
            self.socks.append(sock)
        self.opened = len(self.socks)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for sock in list(self.socks):
                try:
                    sock.send(b" ")
                except BlockingIOError:
                    pass
                except OSError:  # the node closed it; open another in its place
                    self.socks.remove(sock)
                    sock.close()

    @property
    def open_now(self) -> int:
        return len(self.socks)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for sock in self.socks:
            sock.close()
        self.socks.clear()


def _post(http: httpx.Client, node_url: str, signer: Ed25519Signer, type_: str,
          body: dict[str, Any], address: str) -> str:
    frame = seal(signer, type_, body, address=address, now=time.time())
    resp = http.post(f"{node_url}/p2p/rpc", content=frame, timeout=30)
    if resp.status_code != 200:
        return f"HTTP {resp.status_code}"
    return open_frame(resp.content, now=time.time()).type


def fake_providers(node_url: str, digests: Iterable[str], address: str,
                   count: int = 20) -> list[str]:
    """``count`` fresh keys each announce ``digests`` (sha256:... or hex) at ``address``."""
    keys = [d.removeprefix("sha256:") for d in digests]
    with httpx.Client() as http:
        return [_post(http, node_url, Ed25519Signer.generate(), "ADD_PROVIDER",
                      {"keys": keys}, address) for _ in range(count)]


def far_ahead_blocks(node_url: str, address: str, count: int = 12) -> list[str]:
    """``count`` NEW_BLOCKs far ahead of the node's head, certified by the attacker's own
    key (no build node of the network), each from a fresh key naming ``address``."""
    evil = Ed25519Signer.generate()
    with httpx.Client() as http:
        def ask(type_: str) -> Any:
            frame = seal(evil, type_, {}, address=address, now=time.time())
            reply = http.post(f"{node_url}/p2p/rpc", content=frame, timeout=30)
            return open_frame(reply.content, now=time.time()).body

        head = ask("GET_HEAD")
        genesis = CommittedBlock.from_json(ask("GET_GENESIS")["block"])
        ledger = Ledger.start(genesis)
        record = SignedRecord.sign(Record.new(
            signer=evil, package_type="Docker", package_specific_id="evil:1",
            package_specific_artifact_id="evil:1", artifact_hash="ab" * 32, num_artifacts=1,
            timestamp=int(time.time())), evil)
        block = ledger.propose(proposer=evil, records=[record], timestamp=int(time.time()))
        out = []
        for i in range(count):
            far = attrs.evolve(block, height=int(head["height"]) + 1000 + i, parent=head["hash"])
            cert = sign_checkpoint(block_checkpoint(ledger.origin, far),
                                   [(f"{ledger.origin}/{evil.node_id}", evil)])
            out.append(_post(http, node_url, Ed25519Signer.generate(), "NEW_BLOCK",
                             {"block": CommittedBlock(far, cert).to_json()}, address))
        return out


def ping_flood(node_url: str, address: str, count: int = 500) -> list[str]:
    """``count`` PINGs from fresh keys, each claiming ``address`` (path varied)."""
    with httpx.Client() as http:
        return [_post(http, node_url, Ed25519Signer.generate(), "PING", {},
                      f"{address}/p{i}" if i % 2 else address) for i in range(count)]


def pull(node_url: str, repo: str, tag: str, timeout: float = 60) -> float:
    """Pull ``repo:tag`` (the first platform of an index) as a client would: manifest, then
    config and layers, each checked against its digest. Returns the seconds it took."""
    started = time.perf_counter()
    with httpx.Client(base_url=node_url, timeout=timeout) as http:
        resp = http.get(f"/v2/{repo}/manifests/{tag}", headers={"accept": ACCEPT})
        resp.raise_for_status()
        manifest = json.loads(resp.content)
        if "manifests" in manifest:
            digest = manifest["manifests"][0]["digest"]
            resp = http.get(f"/v2/{repo}/manifests/{digest}", headers={"accept": ACCEPT})
            resp.raise_for_status()
            assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == digest
            manifest = json.loads(resp.content)
        for desc in [manifest["config"], *manifest["layers"]]:
            blob = http.get(f"/v2/{repo}/blobs/{desc['digest']}")
            blob.raise_for_status()
            assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == desc["digest"]
    return time.perf_counter() - started


def image_digests(node_url: str, repo: str, tag: str) -> list[str]:
    """The manifest and blob digests of ``repo:tag`` (first platform), as the node serves."""
    with httpx.Client(base_url=node_url, timeout=60) as http:
        resp = http.get(f"/v2/{repo}/manifests/{tag}", headers={"accept": ACCEPT})
        resp.raise_for_status()
        out = ["sha256:" + hashlib.sha256(resp.content).hexdigest()]
        manifest = json.loads(resp.content)
        if "manifests" in manifest:
            out.append(manifest["manifests"][0]["digest"])
            resp = http.get(f"/v2/{repo}/manifests/{out[-1]}", headers={"accept": ACCEPT})
            manifest = json.loads(resp.content)
        return out + [d["digest"] for d in [manifest["config"], *manifest["layers"]]]
