"""Running a node: open it, serve its apps, stop cleanly."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import attrs

from ._api import NodeApi
from ._app import NodeApp
from ._config import NodeConfig
from ._docker import DockerService
from ._node import Node
from ._oci import OciApp

__all__ = ["RunningNode", "run_node", "start_node"]

log = logging.getLogger("pyrsia.node")


@attrs.define(eq=False)
class RunningNode:
    node: Node
    app: NodeApp
    service: DockerService
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.node.config.host}:{self.port}"


@asynccontextmanager
async def start_node(config: NodeConfig, *, serve_http: bool = True) -> AsyncIterator[RunningNode]:
    """Open a node and (optionally) serve it; leaving the block stops it.

    Usable from any anyio program: ``async with start_node(cfg) as running: ...``.
    """
    node = await Node.open(config)
    try:
        async with anyio.create_task_group() as tg:
            service = DockerService(node, tg)
            app = NodeApp(OciApp(service), NodeApi(service))
            running = RunningNode(node, app, service)
            if serve_http:
                from ._server import serve

                port = await tg.start(serve, app, config.host, config.port)
                running.port = port
                node.listen_urls.append(f"http://{config.host}:{port}")
                log.info("Pyrsia node listening on http://%s:%d", config.host, port)
            try:
                yield running
            finally:
                tg.cancel_scope.cancel()
    finally:
        await node.aclose()


async def run_node(config: NodeConfig) -> None:
    """Serve until cancelled, SIGINT (Ctrl-C) or SIGTERM; then close the stores cleanly."""
    import signal

    async with start_node(config) as running:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info(
                    "Received %s, stopping node %s",
                    signal.Signals(signum).name,
                    running.node.node_id,
                )
                return
