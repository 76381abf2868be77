"""A mixed network of real node processes: HTTP+QUIC, QUIC-only and HTTP-only nodes.

The build node speaks both transports and advertises both addresses; the QUIC-only
node and the HTTP-only node each reach it over their own transport, sync its ledger
and pull an image from it (every blob from a peer, verified). The two single-transport
nodes cannot talk to each other, and skip each other's addresses instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
from support.clients import skopeo
from support.fixtures import SeededUpstream
from support.node import NodeProcess, node_status, run_cli, wait_until

pytestmark = pytest.mark.process
FAST = ("--sync-interval", "0.5")
IMAGE = "library/multi:1.0"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def copy(node: NodeProcess, image: str, dest: Path) -> set[str]:
    skopeo("copy", "--all", "--src-tls-verify=false", f"docker://127.0.0.1:{node.port}/{image}",
           f"dir:{dest}")
    return {"sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
            for p in dest.iterdir() if p.name != "version"}


def peers_of(node: NodeProcess, tmp_path: Path) -> dict[str, str]:
    out = run_cli(tmp_path, "list", "--json", port=node.port).stdout
    return {p["node_id"]: p["address"] for p in json.loads(out)}


def test_mixed_http_and_quic_network(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    quic_port = free_udp_port()
    build = NodeProcess(
        tmp_path / "build",
        upstream=fresh_seeded_upstream.url,
        extra=(*FAST, "--transport", "http,quic", "--quic-port", str(quic_port)),
    )
    nodes = [build]
    try:
        build.start()
        quic_peer = f"quic://127.0.0.1:{quic_port}"
        q = NodeProcess(
            tmp_path / "quic-only",
            extra=(*FAST, "--transport", "quic", "--quic-port", "0", "--peer", quic_peer),
        )
        nodes.append(q.start())
        h = NodeProcess(tmp_path / "http-only", extra=(*FAST, "--peer", build.url))
        nodes.append(h.start())

        build_id = node_status(build)["node_id"]
        q_id, h_id = node_status(q)["node_id"], node_status(h)["node_id"]
        # Both joined the build node's network.
        for n in (q, h):
            assert node_status(n)["authorized_build_nodes"] == [build_id]
        assert f"genesis from {quic_peer}" in q.log()
        assert f"genesis from {build.url}" in h.log()

        info = fresh_seeded_upstream.images[IMAGE]
        got = copy(build, IMAGE, tmp_path / "via-build")
        assert set(info.artifact_digests) <= got
        height = node_status(build)["ledger_height"]
        assert height >= 1
        for n in (q, h):
            wait_until(f"{n.url} to sync to height {height}",
                       lambda n=n: node_status(n)["ledger_height"] >= height)
            assert node_status(n)["ledger_head"] == node_status(build)["ledger_head"]

        # The build node advertises both its addresses; each single-transport node
        # knows it, and the build node knows each of them by its own transport.
        wait_until("the build node to know both peers",
                   lambda: {q_id, h_id} <= set(peers_of(build, tmp_path)))
        seen_by_build = peers_of(build, tmp_path)
        assert seen_by_build[q_id].startswith("quic://127.0.0.1:")
        assert seen_by_build[h_id] == h.url
        for n in (q, h):
            address = peers_of(n, tmp_path)[build_id]
            assert address.split(",") == [build.url, quic_peer]

        # Neither node has an upstream: every blob comes from the build node, over
        # QUIC for one and over HTTP for the other, verified against the synced log.
        for n, name in ((q, "via-quic"), (h, "via-http")):
            got_n = copy(n, IMAGE, tmp_path / name)
            assert set(info.artifact_digests) <= got_n
            assert got_n == got
            assert "pulled from peer" in n.log()
            assert "from the upstream" not in n.log().lower()
            assert node_status(n)["artifact_count"] >= len(info.artifact_digests)

        # The QUIC-only and HTTP-only nodes cannot talk; they skip each other's
        # addresses (never a crash, never a routing-table entry that cannot answer).
        assert h_id not in peers_of(q, tmp_path)
        assert q_id not in peers_of(h, tmp_path)
        for n in nodes:
            assert n.proc is not None and n.proc.poll() is None
            assert "Traceback" not in n.log()
    finally:
        for n in nodes:
            n.stop()
