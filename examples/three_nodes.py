"""A three-node pyrsia network started from Python, in one anyio task group.

    python examples/three_nodes.py --upstream https://registry-1.docker.io \\
        --image library/alpine:3.16.2

Node 1 is the build node (it has the upstream); nodes 2 and 3 join its network
(``peers=(node1_url,)``) with no upstream of their own. The script pulls the image
through node 1's OCI API (manifest, then blobs), waits until node 3's ledger holds the
image's records, then fetches the same blobs through node 3, which gets them from a
peer and checks them against the log it synced. Prints a summary; exits 0 on success.
Each node runs in a task of one anyio task group (``await tg.start(serve_node, config)``
returns its ``RunningNode`` once it listens); cancelling the group stops all three.
Everything listens on 127.0.0.1 and lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx

from pyrsia_registry import NodeConfig, RunningNode, start_node

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def pull(
    client: httpx.AsyncClient, node: str, repo: str, tag: str
) -> tuple[int, dict[str, bytes]]:
    """GET the image's manifest (and the first platform's, for an index), then its blobs.

    Returns the number of manifests and the blobs by digest.
    """
    manifests = 0

    async def manifest(reference: str) -> dict[str, Any]:
        nonlocal manifests
        resp = await client.get(f"{node}/v2/{repo}/manifests/{reference}",
                                headers={"Accept": MANIFEST_TYPES})
        resp.raise_for_status()
        manifests += 1
        doc: dict[str, Any] = resp.json()
        return doc

    doc = await manifest(tag)
    if "manifests" in doc:  # an index: take the first platform
        doc = await manifest(doc["manifests"][0]["digest"])
    blobs = {}
    for descriptor in [doc["config"], *doc["layers"]]:
        blobs[descriptor["digest"]] = await blob(client, node, repo, descriptor["digest"])
    return manifests, blobs


async def blob(client: httpx.AsyncClient, node: str, repo: str, digest: str) -> bytes:
    resp = await client.get(f"{node}/v2/{repo}/blobs/{digest}")
    resp.raise_for_status()
    if f"sha256:{hashlib.sha256(resp.content).hexdigest()}" != digest:
        raise RuntimeError(f"{node} returned bytes that do not match {digest}")
    return resp.content


async def records(client: httpx.AsyncClient, node: str, image: str) -> list[dict[str, Any]]:
    resp = await client.get(f"{node}/api/inspect-log/docker", params={"image": image})
    if resp.status_code == 404:
        return []
    resp.raise_for_status()
    items: list[dict[str, Any]] = resp.json()
    return items


async def serve_node(
    config: NodeConfig, *, task_status: anyio.abc.TaskStatus[RunningNode]
) -> None:
    """Run one node until the task group is cancelled; report it once it listens."""
    async with start_node(config) as running:
        task_status.started(running)
        await anyio.sleep_forever()


async def exercise(
    client: httpx.AsyncClient, nodes: list[RunningNode], image: str, sync_timeout: float
) -> None:
    repo, _, tag = image.partition(":")
    short = image.removeprefix("library/")
    n1, _, n3 = nodes
    for i, n in enumerate(nodes, 1):
        print(f"node {i}: {n.url}  id {n.node.node_id[:16]}")

    manifests, blobs = await pull(client, n1.url, repo, tag)
    print(f"pulled {image} through node 1: {manifests} manifest(s), {len(blobs)} blobs, "
          f"{sum(map(len, blobs.values()))} bytes")
    want = len(await records(client, n1.url, short))
    if not want:
        raise RuntimeError(f"node 1 logged no records for {short}")

    with anyio.fail_after(sync_timeout):  # node 3 syncs the ledger from its peer
        while True:
            have = await records(client, n3.url, short)
            if len(have) >= want:
                break
            await anyio.sleep(0.1)
    print(f"node 3's ledger has the {len(have)} records of {short}")

    for digest, data in blobs.items():
        via_n3 = await blob(client, n3.url, repo, digest)
        if via_n3 != data:
            raise RuntimeError(f"node 3 returned different bytes for {digest}")
    print(f"fetched {len(blobs)} blobs through node 3 (from a peer): bytes match")


async def run(upstream: str, image: str, sync_timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="pyrsia-three-") as tmp:
        async with anyio.create_task_group() as tg, httpx.AsyncClient(
            timeout=30, follow_redirects=True, trust_env=False
        ) as client:
            nodes: list[RunningNode] = []
            for i in range(3):
                first = i == 0
                config = NodeConfig(
                    host="127.0.0.1",
                    port=free_port(),
                    data_dir=Path(tmp) / f"node{i + 1}",
                    upstream=upstream if first else None,
                    peers=() if first else (nodes[0].url,),
                    sync_interval=0.5,
                )
                nodes.append(await tg.start(serve_node, config))
            try:
                await exercise(client, nodes, image, sync_timeout)
            finally:
                tg.cancel_scope.cancel()  # stops the three nodes; each closes its stores
    print("OK: three nodes share the ledger and the artifacts")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the build node's upstream registry")
    parser.add_argument("--image", default="library/alpine:3.16.2")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for ledger sync")
    args = parser.parse_args()
    try:
        anyio.run(run, args.upstream, args.image, args.timeout)
    except Exception as exc:  # an ExceptionGroup from the task group, or a plain error
        for error in getattr(exc, "exceptions", [exc]):
            print(f"FAILED: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
