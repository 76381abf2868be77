"""``/healthz`` and ``/readyz`` of real node processes, as Kubernetes probes see them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from support.clients import skopeo
from support.fixtures import SeededUpstream
from support.net import free_port
from support.node import NodeProcess, node_status, wait_until
from support.proxy import GatedProxy

pytestmark = pytest.mark.process


def _probe(node: NodeProcess, path: str) -> httpx.Response:
    return httpx.get(node.url + path, timeout=10, trust_env=False)


def test_a_single_node_is_live_and_ready(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "n") as node:
        live = _probe(node, "/healthz")
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        wait_until("readiness", lambda: _probe(node, "/readyz").status_code == 200, 10)
        ready = _probe(node, "/readyz").json()
        assert ready["status"] == "ready" and ready["ledger_height"] == 0
        head = httpx.head(node.url + "/readyz", timeout=10, trust_env=False)
        assert head.status_code == 200 and head.content == b""
        assert httpx.post(node.url + "/healthz", timeout=10).status_code == 405


def test_a_joining_node_is_not_ready_until_its_ledger_caught_up(
    tmp_path: Path, seeded_upstream: SeededUpstream
) -> None:
    # B reaches A only through a proxy that cuts B's block downloads (GET_BLOCKS) at first:
    # B knows A is ahead but cannot catch up, so it must say 503 until the proxy lets go.
    a_port = free_port()
    with GatedProxy(a_port, cut=b'"type":"GET_BLOCKS"') as proxy, NodeProcess(
        tmp_path / "a", port=a_port, upstream=seeded_upstream.url,
        extra=("--public-url", proxy.url),
    ) as a:
        skopeo("copy", "--src-tls-verify=false",
               f"docker://127.0.0.1:{a.port}/library/alpine:3.16.2", f"dir:{tmp_path / 'x'}")
        wait_until("A's ledger grows", lambda: node_status(a)["ledger_height"] >= 1, 30)
        height = node_status(a)["ledger_height"]
        with NodeProcess(tmp_path / "b", extra=("--peer", proxy.url,
                                                "--sync-interval", "0.5")) as b:
            def reason() -> str:
                resp = _probe(b, "/readyz")
                assert resp.status_code == 503, resp.text
                return str(resp.json()["reason"])

            wait_until("B to learn it is behind", lambda: "behind" in reason(), 20)
            assert node_status(b)["ledger_height"] < height
            time.sleep(1.5)  # several sync rounds, every one cut: still not ready
            assert "behind" in reason() and f"reported {height}" in reason()
            assert proxy.cut_count >= 2
            assert _probe(b, "/healthz").status_code == 200  # alive all along
            proxy.cutting = False
            wait_until("B ready", lambda: _probe(b, "/readyz").status_code == 200, 20)
            assert node_status(b)["ledger_height"] == height
            assert _probe(b, "/readyz").json()["ledger_height"] == height


def test_a_node_whose_peer_never_answered_is_not_ready(tmp_path: Path) -> None:
    # A's peer service answers nothing after B fetched the genesis: B is live, not ready.
    with NodeProcess(tmp_path / "a") as a:
        a_port = a.port
        with GatedProxy(a_port, cut=b'"type":"PING"') as proxy, NodeProcess(
            tmp_path / "b", extra=("--peer", proxy.url, "--sync-interval", "0.5")
        ) as b:
            def answer() -> httpx.Response:
                return _probe(b, "/readyz")

            wait_until("bootstrap over", lambda: "bootstrap" not in answer().json()["reason"],
                       20)
            resp = answer()
            assert resp.status_code == 503
            assert "none of the configured peers" in resp.json()["reason"]
            proxy.cutting = False
            wait_until("B ready", lambda: answer().status_code == 200, 20)
