"""The node's HTTP surface: the node API at ``/api/``, peers at ``/p2p``, and each
package-type plugin's app at its mount path (the Docker plugin's OCI API at ``/v2``)."""

from __future__ import annotations

from typing import Any

import attrs
from pyrsia_core.asgi import Receive, Scope, Send, lifespan, route_path, send_json

from ._activity import metered
from ._api import NodeApi
from ._health import HEALTH_PATHS, health
from ._metrics import METRICS_PATH, metrics
from ._statuspage import STATUS_PATHS, status_page

__all__ = ["NodeApp"]


#: What ``/v2/`` answers on a node without the Docker package type.
NO_DOCKER = ("no Docker package type is installed on this node: install the "
             "pyrsia-pkg-docker distribution (pip install pyrsia-pkg-docker) to serve "
             "OCI images")


@attrs.define(eq=False)
class NodeApp:
    """The node's HTTP surface as one ASGI app: the node API at ``/api``, the probes
    ``/healthz`` and ``/readyz``, the peer transport's app at ``/p2p``, package-type plugins'
    mounts (``/v2``, ``/maven2``), the status page at ``/`` and ``/metrics``. Requests to
    package mounts are counted for ``/metrics`` and the status page (``metered``)."""

    api: NodeApi
    p2p: Any = None  # the transport's ASGI app for peers, mounted at /p2p
    #: Package-type plugins' apps by mount path (``/maven2``), each behind a GuardedApp.
    packages: dict[str, Any] = attrs.Factory(dict)
    #: The witness endpoint (C2SP tlog-witness) at ``/witness``.
    witness: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = route_path(scope)
        node = self.api.node
        if path in STATUS_PATHS:
            await status_page(node, path, scope, receive, send)
        elif path == METRICS_PATH:
            await metrics(node, scope, receive, send)
        elif path == "/api" or path.startswith("/api/"):
            await self.api(scope, receive, send)
        elif path in HEALTH_PATHS:
            await health(node, path, scope, receive, send)
        elif self.witness is not None and (path == "/witness" or path.startswith("/witness/")):
            await self.witness(scope, receive, send)
        elif self.p2p is not None and (path == "/p2p" or path.startswith("/p2p/")):
            child = dict(scope)
            child["root_path"] = scope.get("root_path", "") + "/p2p"
            await self.p2p(child, receive, send)
        else:
            for prefix, app in self.packages.items():
                if path == prefix or path.startswith(prefix + "/"):
                    child = dict(scope)
                    child["root_path"] = scope.get("root_path", "") + prefix
                    await metered(node.activity, prefix, app, child, receive, send)
                    return
            if path == "/v2" or path.startswith("/v2/"):
                await send_json(send, 404, {"errors": [{
                    "code": "UNSUPPORTED", "message": NO_DOCKER,
                    "detail": {"distribution": "pyrsia-pkg-docker"}}]},
                    [("docker-distribution-api-version", "registry/2.0")],
                    head=scope.get("method") == "HEAD")
                return
            await send_json(send, 404, {"errors": [{"code": "NOT_FOUND",
                                                    "message": f"no route for {path[:200]}"}]})
