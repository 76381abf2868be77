"""Bad bytes from the upstream never reach the store, the log or a client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.clients import ToolError, skopeo
from support.fixtures import SeededUpstream
from support.node import NodeProcess, run_cli

pytestmark = pytest.mark.process


def _blob_file(upstream: SeededUpstream, digest: str) -> Path:
    hex_ = digest.removeprefix("sha256:")
    path = (upstream.registry.storage_dir / "docker" / "registry" / "v2" / "blobs" / "sha256"
            / hex_[:2] / hex_ / "data")
    assert path.exists(), path
    return path


def test_tampered_layer_fails_the_build_and_stores_nothing(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    info = fresh_seeded_upstream.images["library/ociimage:1.0"]
    layer = _blob_file(fresh_seeded_upstream, info.layer_digests[-1])
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    layer.write_bytes(bytes(data))

    with NodeProcess(tmp_path / "n", upstream=fresh_seeded_upstream.url) as node:
        before = json.loads(run_cli(tmp_path, "status", "--json", port=node.port).stdout)
        with pytest.raises(ToolError):
            skopeo("copy", "--src-tls-verify=false",
                   f"docker://127.0.0.1:{node.port}/library/ociimage:1.0", f"dir:{tmp_path / 'x'}")
        after = json.loads(run_cli(tmp_path, "status", "--json", port=node.port).stdout)
        # Nothing was stored (not even the manifest and config that were fine) and the log
        # did not grow.
        assert after["artifact_count"] == before["artifact_count"] == 0
        assert after["ledger_height"] == before["ledger_height"]
        assert after["log_records"] == before["log_records"]
        log = node.log()
        assert "digest mismatch" in log
        out = run_cli(tmp_path, "inspect-log", "docker", "--image", "ociimage:1.0", port=node.port)
        assert out.returncode != 0
        r = node.get(f"/v2/library/ociimage/blobs/{info.layer_digests[-1]}")
        assert r.status_code == 404 and r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
        # An untouched image still builds and serves.
        skopeo("copy", "--src-tls-verify=false",
               f"docker://127.0.0.1:{node.port}/library/alpine:3.16.2", f"dir:{tmp_path / 'y'}")


def test_tampered_manifest_is_refused(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    info = fresh_seeded_upstream.images["library/multi:1.0"]
    # Corrupt the arm64 manifest: the index names its digest, the bytes no longer match.
    arm = next(p for name, p in info.platforms.items() if "arm64" in name)
    path = _blob_file(fresh_seeded_upstream, arm.manifest_digest)
    path.write_bytes(path.read_bytes().replace(b'"size"', b'"size" ', 1))
    with NodeProcess(tmp_path / "n", upstream=fresh_seeded_upstream.url) as node:
        r = node.get("/v2/library/multi/manifests/1.0")
        assert r.status_code >= 400 and r.status_code != 500
        assert "errors" in r.json()
        status = json.loads(run_cli(tmp_path, "status", "--json", port=node.port).stdout)
        assert status["artifact_count"] == 0 and status["ledger_height"] == 0


def test_disk_quota_evicts_and_refetches_verified(
    tmp_path: Path, seeded_upstream: SeededUpstream
) -> None:
    images = ["library/alpine:3.16.2", "library/ociimage:1.0", "some/nested/repo:v1",
              "library/multi:1.0"]
    with NodeProcess(tmp_path / "n", upstream=seeded_upstream.url,
                     extra=("--disk-space", "60 KB")) as node:
        for i, image in enumerate(images):
            skopeo("copy", "--all", "--src-tls-verify=false",
                   f"docker://127.0.0.1:{node.port}/{image}", f"dir:{tmp_path / str(i)}")
        status = json.loads(run_cli(tmp_path, "status", "--json", port=node.port).stdout)
        assert status["disk_usage"] <= 60_000 < status["disk_allocated"] + 1
        assert "Evicted" in node.log()
        # The first image's blobs were evicted; pulling it again re-fetches them, verified
        # against the log, and the bytes are the upstream's.
        mark = seeded_upstream.registry.mark()
        skopeo("copy", "--src-tls-verify=false",
               f"docker://127.0.0.1:{node.port}/{images[0]}", f"dir:{tmp_path / 'again'}")
        assert any("/blobs/" in p for _, p, _ in seeded_upstream.registry.requests_since(mark))
        info = seeded_upstream.images[images[0]]
        import hashlib

        got = {"sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
               for p in (tmp_path / "again").iterdir() if p.name != "version"}
        assert set(info.artifact_digests) <= got
        # The log holds every build exactly once: eviction never touches the log.
        assert status["ledger_height"] == len(images)
