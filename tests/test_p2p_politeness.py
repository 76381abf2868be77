"""Politeness: an upload rate cap that holds, and a node that pulls but never serves."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from support.images import make_image_layout, push
from support.node import NodeProcess
from support.registry import UpstreamRegistry

pytestmark = pytest.mark.process
FAST = ("--sync-interval", "0.5")
MB = 1_000_000


def _height(n: NodeProcess) -> int:
    return int(httpx.get(f"{n.url}/api/status", timeout=30).json()["ledger_height"])


def _wait_synced(n: NodeProcess, height: int) -> None:
    deadline = time.monotonic() + 30
    while _height(n) < height:
        assert time.monotonic() < deadline, "node did not sync"
        time.sleep(0.1)


def test_upload_rate_cap_and_no_serve(tmp_path: Path) -> None:
    with UpstreamRegistry(tmp_path / "up") as reg:
        layout = make_image_layout(tmp_path / "layout", seed="polite", layers=1,
                                   layer_size=12 * 1024 * 1024, tag="1.0")
        push(layout, reg, "library/polite", "1.0", format="v2s2", src_tag="1.0")
        layer = httpx.get(f"{reg.url}/v2/library/polite/manifests/1.0", headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json"}).json()["layers"][0]
        digest, size = layer["digest"], layer["size"]
        rate = 4 * MB
        with NodeProcess(tmp_path / "a", upstream=reg.url,
                         extra=(*FAST, "--max-upload-rate", "4MB/s")) as a:
            assert httpx.get(f"{a.url}/v2/library/polite/manifests/1.0", timeout=60).is_success
            httpx.get(f"{a.url}/api/status", timeout=60)  # waits for the build to commit
            with NodeProcess(tmp_path / "b", upstream=None, extra=(*FAST, "--peer", a.url)) as b, \
                    NodeProcess(tmp_path / "n", upstream=None,
                                extra=(*FAST, "--peer", a.url, "--no-serve")) as n:
                _wait_synced(b, _height(a))
                _wait_synced(n, _height(a))
                t = time.perf_counter()
                r = httpx.get(f"{b.url}/v2/library/polite/blobs/{digest}", timeout=120)
                elapsed = time.perf_counter() - t
                assert r.status_code == 200 and len(r.content) == size
                measured = size / elapsed
                # The cap holds within 10 % (a small burst allowance is included).
                assert rate * 0.9 <= measured <= rate * 1.1, f"{measured / MB:.2f} MB/s"
                assert "pulled from peer" in b.log()

                # --no-serve: N still pulls (from B or A)...
                r = httpx.get(f"{n.url}/v2/library/polite/blobs/{digest}", timeout=120)
                assert r.status_code == 200 and len(r.content) == size
                # ...but serves nobody: its peer endpoint refuses the blob it holds.
                assert httpx.get(f"{n.url}/p2p/blobs/{digest}", timeout=30).status_code == 404
                assert httpx.get(f"{b.url}/p2p/blobs/{digest}", timeout=30).status_code == 200
