"""Embed a pyrsia node in an existing Starlette app: its routes and pyrsia's side by side.

    python examples/embed_in_starlette.py --port 8080 --upstream https://registry-1.docker.io \\
        --data-dir /tmp/pyrsia-embedded

The host app keeps its own routes (``GET /health``, ``GET /hello``); every other path
goes to the pyrsia node's ASGI app, so ``/v2/...`` is pyrsia's OCI Distribution API
(``docker pull 127.0.0.1:8080/library/alpine:3.16.2`` works), ``/api/...`` its node API
and ``/p2p/...`` its peer endpoint. The node runs inside the Starlette lifespan with
``start_node(config, serve_http=False)``: uvicorn serves everything on one port.

Why a fallback mount at ``/`` and not ``Mount("/v2", app=node.app.oci)``: a Starlette
``Mount`` appends its prefix to ``root_path``, and pyrsia's apps route on the path *below*
``root_path``; the OCI API must see ``/v2/...`` there (the OCI spec fixes that path), so
it has to be mounted at the root. Host routes are matched first; pyrsia gets the rest.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from pyrsia_registry import NodeApp, NodeConfig, start_node


class PyrsiaNode:
    """An ASGI app that forwards to the pyrsia node once the lifespan has started it."""

    def __init__(self) -> None:
        self.app: NodeApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            response = JSONResponse({"errors": [{"code": "UNAVAILABLE",
                                                 "message": "pyrsia node not started"}]}, 503)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "from the host registry app", "pyrsia": "/v2/"})


def create_app(config: NodeConfig) -> Starlette:
    pyrsia = PyrsiaNode()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with start_node(config, serve_http=False) as running:
            pyrsia.app = running.app
            try:
                yield
            finally:
                pyrsia.app = None

    routes = [
        Route("/health", health),
        Route("/hello", hello),
        Mount("/", app=pyrsia),  # last: everything the host app does not serve
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--upstream", default="https://registry-1.docker.io")
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    # The node's own URL (what it tells peers) is the port uvicorn serves.
    config = NodeConfig(host=args.host, port=args.port, data_dir=args.data_dir,
                        upstream=args.upstream)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
