"""A real node process serving real clients (skopeo, podman) from a real upstream registry."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.clients import ToolError, podman, skopeo, write_registries_conf
from support.fixtures import SeededUpstream
from support.node import NodeProcess, run_cli

pytestmark = pytest.mark.process

IMAGES = [
    "library/alpine:3.16.2",
    "library/multi:1.0",
    "library/ocimulti:1.0",
    "library/ociimage:1.0",
    "some/nested/repo:v1",
]


@pytest.fixture
def node(tmp_path: Path, seeded_upstream: SeededUpstream) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path / "node", upstream=seeded_upstream.url) as n:
        yield n


def _sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("image", IMAGES)
def test_skopeo_copy_and_inspect_match_upstream(
    node: NodeProcess, seeded_upstream: SeededUpstream, tmp_path: Path, image: str
) -> None:
    info = seeded_upstream.images[image]
    src = f"docker://127.0.0.1:{node.port}/{image}"
    raw = skopeo("inspect", "--raw", "--tls-verify=false", src).stdout
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == info.manifest_digest
    inspected = json.loads(skopeo("inspect", "--tls-verify=false", src).stdout)
    if not info.is_index:
        assert inspected["Digest"] == info.manifest_digest
    dest = tmp_path / "copy"
    skopeo("copy", "--all", "--src-tls-verify=false", src, f"dir:{dest}")
    got = {_sha256_file(p) for p in dest.iterdir() if p.name != "version"}
    # Every manifest, config and layer of the upstream image arrived, byte for byte.
    assert set(info.artifact_digests) <= got
    log = node.log()
    repo, _, tag = image.rpartition(":")
    assert f"Fetching manifest for {repo}:{tag}" in log
    assert "pulled from upstream" in log


def test_second_pull_is_served_from_cache(
    node: NodeProcess, seeded_upstream: SeededUpstream, tmp_path: Path
) -> None:
    src = f"docker://127.0.0.1:{node.port}/library/multi:1.0"
    skopeo("copy", "--all", "--src-tls-verify=false", src, f"dir:{tmp_path / 'a'}")
    mark = seeded_upstream.registry.mark()
    skopeo("copy", "--all", "--src-tls-verify=false", src, f"dir:{tmp_path / 'b'}")
    assert seeded_upstream.registry.requests_since(mark) == []
    assert "served from cache" in node.log()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        p.name for p in (tmp_path / "b").iterdir()
    )


def test_podman_pulls_through_the_mirror(
    node: NodeProcess, seeded_upstream: SeededUpstream, podman_dir: Path
) -> None:
    conf = write_registries_conf(podman_dir / "registries.conf", [f"127.0.0.1:{node.port}"])
    podman(podman_dir, "pull", "docker.io/library/alpine:3.16.2", registries_conf=conf)
    podman(
        podman_dir, "pull", "--arch", "arm64", "docker.io/library/multi:1.0", registries_conf=conf
    )
    podman(
        podman_dir,
        "pull",
        "--arch",
        "arm64",
        "docker.io/library/ocimulti:1.0",
        registries_conf=conf,
    )
    fmt = "{{.Architecture}} {{.Digest}}"
    arm = podman(
        podman_dir, "image", "inspect", "--format", fmt, "docker.io/library/multi:1.0"
    ).stdout.split()
    assert arm[0] == "arm64"
    oci_arm = podman(
        podman_dir, "image", "inspect", "--format", fmt, "docker.io/library/ocimulti:1.0"
    ).stdout.split()
    assert oci_arm[0] == "arm64"
    amd = podman(
        podman_dir, "image", "inspect", "--format", fmt, "docker.io/library/alpine:3.16.2"
    ).stdout.split()
    assert amd[0] == "amd64"
    assert amd[1] == seeded_upstream.images["library/alpine:3.16.2"].manifest_digest
    assert "Fetching manifest for library/alpine:3.16.2" in node.log()


def test_inspect_log_prints_the_seed_records(
    node: NodeProcess, seeded_upstream: SeededUpstream, tmp_path: Path
) -> None:
    info = seeded_upstream.images["library/alpine:3.16.2"]
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://127.0.0.1:{node.port}/library/alpine:3.16.2",
        f"dir:{tmp_path / 'x'}",
    )
    out = run_cli(tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2", port=node.port)
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    seed_types = {
        "id": str,
        "package_type": str,
        "package_specific_id": str,
        "num_artifacts": int,
        "package_specific_artifact_id": str,
        "artifact_hash": str,
        "source_hash": str,
        "artifact_id": str,
        "source_id": str,
        "timestamp": int,
        "operation": str,
        "node_id": str,
        "node_public_key": str,
    }
    assert len(records) == 4  # tag -> manifest, manifest by digest, config, layer (as the seed)
    for r in records:
        assert list(r) == list(seed_types)
        assert {k: type(v) for k, v in r.items()} == seed_types
        assert r["package_type"] == "Docker" and r["package_specific_id"] == "alpine:3.16.2"
        assert r["num_artifacts"] == 4 and r["operation"] == "AddArtifact"
        assert r["node_id"] == hashlib.sha256(bytes.fromhex(r["node_public_key"])).hexdigest()
    manifest_hex = info.manifest_digest.removeprefix("sha256:")
    assert records[0]["package_specific_artifact_id"] == "alpine:3.16.2"
    assert records[0]["artifact_hash"] == manifest_hex
    assert records[1]["package_specific_artifact_id"] == f"alpine@{info.manifest_digest}"
    assert {r["artifact_hash"] for r in records[2:]} == {
        d.removeprefix("sha256:") for d in info.blob_digests
    }
    status = json.loads(run_cli(tmp_path, "status", "--json", port=node.port).stdout)
    assert {r["node_id"] for r in records} == {status["node_id"]}
    assert status["node_public_key"] == records[0]["node_public_key"]

    csv_out = run_cli(
        tmp_path,
        "inspect-log",
        "docker",
        "--image",
        "alpine:3.16.2",
        "--format",
        "csv",
        "--fields",
        "artifact_hash,package_specific_artifact_id",
        port=node.port,
    ).stdout.splitlines()
    assert csv_out[0] == "artifact_hash,package_specific_artifact_id"
    assert csv_out[1] == f"{manifest_hex},alpine:3.16.2" and len(csv_out) == 5

    fields = json.loads(
        run_cli(
            tmp_path,
            "inspect-log",
            "docker",
            "--image",
            "alpine:3.16.2",
            "--fields",
            "artifact_hash",
            port=node.port,
        ).stdout
    )
    assert fields == [{"artifact_hash": r["artifact_hash"]} for r in records]
    bad = run_cli(
        tmp_path,
        "inspect-log",
        "docker",
        "--image",
        "alpine:3.16.2",
        "--fields",
        "nope",
        port=node.port,
    )
    assert bad.returncode != 0 and "unknown field" in bad.stderr
    missing = run_cli(tmp_path, "inspect-log", "docker", "--image", "alpine:9.9", port=node.port)
    assert missing.returncode != 0 and "no transparency log records" in missing.stderr


def test_inspect_log_proof_verifies_offline(node: NodeProcess, tmp_path: Path) -> None:
    from pyrsia_core import (
        NoteVerifier,
        PublicKey,
        Record,
        SignedNote,
        canonical_json,
        leaf_hash,
        open_checkpoint,
        verify_inclusion,
    )

    for image in ("library/alpine:3.16.2", "library/ociimage:1.0"):
        skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://127.0.0.1:{node.port}/{image}",
            f"dir:{tmp_path / image.replace('/', '_')}",
        )
    out = run_cli(
        tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2", "--proof", port=node.port
    )
    records = json.loads(out.stdout)
    status = json.loads(run_cli(tmp_path, "status", "--json", port=node.port).stdout)
    key = PublicKey.from_hex(status["node_public_key"])
    origin = status["network_origin"]
    for r in records:
        proof = r.pop("proof")
        note = SignedNote.parse(proof["checkpoint"])
        checkpoint, signers = open_checkpoint(
            proof["checkpoint"], [NoteVerifier(f"{origin}/{key.node_id}", key)], 1
        )
        assert signers == {f"{origin}/{key.node_id}"} and note.text
        assert checkpoint.size == proof["tree_size"]
        leaf = leaf_hash(canonical_json(Record.from_json(r).to_json()))
        verify_inclusion(
            leaf,
            proof["leaf_index"],
            proof["tree_size"],
            [bytes.fromhex(h) for h in proof["inclusion_proof"]],
            checkpoint.root,
        )
        # A record changed after the fact no longer verifies.
        r2 = dict(r, artifact_hash="0" * 64)
        from pyrsia_core.errors import ProofError

        with pytest.raises(ProofError):
            verify_inclusion(
                leaf_hash(canonical_json(r2)),
                proof["leaf_index"],
                proof["tree_size"],
                [bytes.fromhex(h) for h in proof["inclusion_proof"]],
                checkpoint.root,
            )
    latest = json.loads(
        run_cli(
            tmp_path,
            "inspect-log",
            "docker",
            "--image",
            "alpine:3.16.2",
            "--latest",
            port=node.port,
        ).stdout
    )
    assert len(latest) == 4


def test_restart_keeps_ledger_and_cache(tmp_path: Path, seeded_upstream: SeededUpstream) -> None:
    image = "library/ocimulti:1.0"
    with NodeProcess(tmp_path / "n", upstream=seeded_upstream.url) as n:
        skopeo(
            "copy",
            "--all",
            "--src-tls-verify=false",
            f"docker://127.0.0.1:{n.port}/{image}",
            f"dir:{tmp_path / 'a'}",
        )
        before = json.loads(run_cli(tmp_path, "status", "--json", port=n.port).stdout)
        port = n.port
    # Same data dir, and no upstream at all now: everything comes from the node's own store.
    with NodeProcess(tmp_path / "n", port=port, upstream=None) as n:
        after = json.loads(run_cli(tmp_path, "status", "--json", port=n.port).stdout)
        assert after["node_id"] == before["node_id"]
        assert after["ledger_height"] == before["ledger_height"]
        assert after["log_records"] == before["log_records"]
        skopeo(
            "copy",
            "--all",
            "--src-tls-verify=false",
            f"docker://127.0.0.1:{n.port}/{image}",
            f"dir:{tmp_path / 'b'}",
        )
        out = run_cli(tmp_path, "inspect-log", "docker", "--image", "ocimulti:1.0", port=n.port)
        # index by tag, index by digest, 2 platform manifests, 2 configs, 2 layers
        assert len(json.loads(out.stdout)) == 8


def test_token_auth_upstream(tmp_path: Path, token_upstream) -> None:  # type: ignore[no-untyped-def]
    before_tokens = token_upstream.token_server.request_count
    mark = token_upstream.mark()
    with NodeProcess(tmp_path / "n", upstream=token_upstream.url) as n:
        skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://127.0.0.1:{n.port}/library/alpine:3.16.2",
            f"dir:{tmp_path / 'a'}",
        )
    assert token_upstream.token_server.request_count > before_tokens
    assert token_upstream.unauthorized_since(mark)  # the node met the 401 challenge first
    statuses = [s for _, path, s in token_upstream.requests_since(mark) if "/blobs/" in path]
    assert statuses and 200 in statuses


def test_unknown_image_is_a_clean_error(node: NodeProcess, tmp_path: Path) -> None:
    with pytest.raises(ToolError) as info:
        skopeo(
            "inspect",
            "--tls-verify=false",
            f"docker://127.0.0.1:{node.port}/library/doesnotexist:1.0",
        )
    assert "manifest unknown" in str(info.value).lower() or "not found" in str(info.value).lower()
    r = node.get("/v2/library/doesnotexist/manifests/1.0")
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
