"""Real nodes (ledger, stores, PeerService) on pyrsia_core's in-memory network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyrsia_core.testing import MemoryNetwork
from pyrsia_registry._p2p import PeerConfig, PeerService

from pyrsia_core import CommittedBlock
from pyrsia_registry import Node, NodeConfig


async def memory_node(tmp: Path, name: str, genesis: CommittedBlock | None) -> Node:
    """A node with in-memory stores; with ``genesis``, it joins that network."""
    config = NodeConfig(data_dir=tmp / name, kv_store="memory", blob_store="memory",
                        upstream=None)

    async def source() -> CommittedBlock:
        assert genesis is not None
        return genesis

    return await Node.open(config, genesis_source=source if genesis else None)


def attach(net: MemoryNetwork, node: Node, address: str, **config: Any) -> PeerService:
    """Serve ``node`` at ``address`` on ``net`` (PeerConfig fields in ``config``)."""
    peers = PeerService(node, net.transport(), PeerConfig(public_url=address, **config))
    node.peers = peers
    net.serve(address, peers.handle, peers.blob_source)
    return peers
