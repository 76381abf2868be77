"""``pyrsia cache list|prune`` as a user runs them, against a real node."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
import pytest
from support.fixtures import SeededUpstream
from support.node import NodeProcess, run_cli

pytestmark = pytest.mark.process


def _pull_alpine(node: NodeProcess, upstream: SeededUpstream) -> list[str]:
    info = upstream.images["library/alpine:3.16.2"]
    assert node.get("/v2/library/alpine/manifests/3.16.2").status_code == 200
    deadline = time.monotonic() + 30
    while node.get("/api/inspect-log/docker", params={"image": "alpine:3.16.2"}).status_code \
            != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for digest in info.blob_digests:
        assert node.get(f"/v2/library/alpine/blobs/{digest}").status_code == 200
    return list(info.blob_digests)


def test_cache_list_and_prune(tmp_path: Path, seeded_upstream: SeededUpstream) -> None:
    with NodeProcess(tmp_path / "n", upstream=seeded_upstream.url) as node:
        out = run_cli(tmp_path, "cache", "list", port=node.port)
        assert out.returncode == 0 and "The cache is empty." in out.stdout, out.stderr
        digests = _pull_alpine(node, seeded_upstream)
        out = run_cli(tmp_path, "cache", "list", port=node.port)
        assert out.returncode == 0, out.stderr
        for digest in digests:
            assert digest in out.stdout
        assert "alpine" in out.stdout
        listed = json.loads(run_cli(tmp_path, "cache", "list", "--json", port=node.port).stdout)
        assert {b["digest"] for b in listed["blobs"]} >= set(digests)
        # Prune needs the admin token: a wrong one is refused, nothing is removed.
        out = run_cli(tmp_path, "cache", "prune", "--all", "--token", "x" * 32, port=node.port)
        assert out.returncode != 0 and "admin token" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert len(node.get("/api/cache").json()["blobs"]) == len(listed["blobs"])
        out = run_cli(tmp_path, "cache", "prune", "--bytes", "1", "--data-dir",
                      str(node.data_dir), port=node.port)
        assert out.returncode == 0, out.stderr
        assert f"removed  {listed['blobs'][0]['digest']}" in out.stdout
        assert "Pruned 1 blob(s)" in out.stdout
        out = run_cli(tmp_path, "cache", "prune", "--older-than", "3600", "--data-dir",
                      str(node.data_dir), port=node.port)
        assert out.returncode == 0 and "Pruned 0 blob(s)" in out.stdout, out.stderr
        out = run_cli(tmp_path, "cache", "prune", "--all", "--json", "--data-dir",
                      str(node.data_dir), port=node.port)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["disk_usage"] == 0
        # Pruned blobs are fetched again, verified, when asked for.
        for digest in digests:
            resp = httpx.get(f"{node.url}/v2/library/alpine/blobs/{digest}", timeout=30)
            assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == digest


def test_cache_prune_usage_errors(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "cache", "prune", port=1)
    assert out.returncode == 2 and "--bytes" in out.stderr
    out = run_cli(tmp_path, "cache", "prune", "--bytes", "lots", "--token", "t" * 20, port=1)
    assert out.returncode == 2 and "--bytes" in out.stderr and "Traceback" not in out.stderr
