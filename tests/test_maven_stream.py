"""Maven files stream through the node (the package-type contract's sink), on real nodes.

A jar of 10 MiB is streamed into the blob store while it is hashed (SHA-256 for the log,
SHA-1 against the upstream's published ``.sha1``), logged with a part list (it is over
the swarm threshold), and served whole and verified. A jar whose bytes do not match the
upstream's ``.sha1`` fails the build and leaves nothing in the store.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.maven import maven_upstream, write_gav
from support.net import free_port

from pyrsia_core import PARTS_RECORD_TYPE, Digest

pytestmark = pytest.mark.process
JAR = "com/example/big/1.0/big-1.0.jar"


@asynccontextmanager
async def _node(tmp: Path, maven: str) -> AsyncIterator[Any]:
    from pyrsia_registry import NodeConfig, start_node

    config = NodeConfig(host="127.0.0.1", port=free_port(), data_dir=tmp / "node",
                        upstream=None, package_options={"maven": {"upstream": maven}})
    async with start_node(config) as running:
        yield running


def _big_gav(root: Path, *, good_sha1: bool = True) -> bytes:
    write_gav(root, "com.example", "big", "1.0", sha1=True)
    data = random.Random("big").randbytes(10 * 1024 * 1024)
    (root / JAR).write_bytes(data)
    sha1 = hashlib.sha1(data if good_sha1 else b"other").hexdigest()
    (root / f"{JAR}.sha1").write_text(sha1 + "\n")
    return data


@pytest.mark.anyio
async def test_a_large_jar_streams_is_logged_with_a_part_list_and_served(
    tmp_path: Path,
) -> None:
    data = _big_gav(tmp_path / "repo")
    with maven_upstream(tmp_path / "repo") as upstream:
        async with _node(tmp_path, upstream.url) as running, httpx.AsyncClient(
                base_url=running.url, timeout=60) as client:
            resp = await client.get(f"/maven2/{JAR}")
            assert resp.status_code == 200
            assert resp.content == data
            assert resp.headers["content-length"] == str(len(data))
            digest = Digest.of(data)
            node = running.node
            records = await node.records_for_package("Maven2", "com.example:big:1.0")
            assert {r.signed.record.artifact_hash for r in records} >= {digest.hex}
            parts = await node.records_for_package(PARTS_RECORD_TYPE, str(digest))
            assert len(parts) == 1
            sha1 = await client.get(f"/maven2/{JAR}.sha1")
            assert sha1.text == hashlib.sha1(data).hexdigest()
            head = await client.head(f"/maven2/{JAR}")
            assert head.status_code == 200 and head.headers["content-length"] == str(len(data))


@pytest.mark.anyio
async def test_a_jar_that_fails_its_sha1_is_not_logged_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    data = _big_gav(tmp_path / "repo", good_sha1=False)
    with maven_upstream(tmp_path / "repo") as upstream:
        async with _node(tmp_path, upstream.url) as running, httpx.AsyncClient(
                base_url=running.url, timeout=60) as client:
            resp = await client.get(f"/maven2/{JAR}")
            assert resp.status_code == 502
            assert ".sha1" in resp.json()["errors"][0]["message"]
            node = running.node
            assert not await node.records_for_package("Maven2", "com.example:big:1.0")
            assert await node.blobs.stat(Digest.of(data)) is None


@pytest.mark.anyio
async def test_verify_and_inspect_log_work_for_maven_through_the_cli(tmp_path: Path) -> None:
    """``pyrsia verify`` is not Docker's alone: any installed package type is verified
    offline from a node's data directory (and refused for an unknown type)."""
    import anyio
    from support.node import run_cli

    data = _big_gav(tmp_path / "repo")
    with maven_upstream(tmp_path / "repo") as upstream:
        async with _node(tmp_path, upstream.url) as running, httpx.AsyncClient(
                base_url=running.url, timeout=60) as client:
            assert (await client.get(f"/maven2/{JAR}")).content == data
            port = running.port
            out = await anyio.to_thread.run_sync(lambda: run_cli(
                tmp_path / "cli", "inspect-log", "maven", "--gav", "com.example:big:1.0",
                "--fields", "package_specific_artifact_id", port=port))
            assert out.returncode == 0, out.stderr
            assert JAR in out.stdout
    ok = await anyio.to_thread.run_sync(lambda: run_cli(
        tmp_path / "cli", "verify", "maven", "--gav", "com.example:big:1.0", "--data-dir",
        str(tmp_path / "node")))
    assert ok.returncode == 0, ok.stderr
    assert f"verified  {JAR}" in ok.stdout
    assert "2 stored artifact(s) hash correctly" in ok.stdout
    unknown = await anyio.to_thread.run_sync(lambda: run_cli(
        tmp_path / "cli", "verify", "nosuchtype", "--id", "x", "--data-dir",
        str(tmp_path / "node")))
    assert unknown.returncode != 0
    assert "unknown package type 'nosuchtype'" in unknown.stderr
    assert "docker" in unknown.stderr and "maven" in unknown.stderr
