"""Several peer transports in one node, chosen per peer by the address's scheme.

A node may speak HTTP, QUIC or both (``NodeConfig.transport = "http,quic"``). It
advertises every address it listens on as one comma-separated list, e.g.
``http://127.0.0.1:7888,quic://127.0.0.1:7888``, in the ``addr`` of its frames and so in
every contact and provider record others keep of it. A peer that connects picks the
first address whose scheme it speaks; a node that speaks none of a contact's schemes
skips that contact (:meth:`TransportSet.speaks`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pyrsia_core.errors import TransportError, UsageError
from pyrsia_core.interfaces import (
    BlobSource,
    PeerAddress,
    PeerClient,
    PeerTransport,
    RequestHandler,
)

__all__ = ["TransportSet", "create_transports", "split_address", "transport_names"]

log = logging.getLogger("pyrsia.p2p")

#: The URL schemes each built-in transport speaks (others: their own name).
_SCHEMES: dict[str, tuple[str, ...]] = {"http": ("http", "https"), "quic": ("quic",)}


def split_address(address: str) -> list[str]:
    """The transport URLs of a (possibly multi-) address, in order of preference."""
    return [part.strip() for part in address.split(",") if part.strip()]


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


class TransportSet(PeerTransport):
    """Transports by name; ``connect`` dispatches on the peer address's scheme."""

    name: ClassVar[str] = "set"

    def __init__(self, transports: Mapping[str, PeerTransport]) -> None:
        if not transports:
            raise UsageError("a node needs at least one peer transport")
        self.transports = dict(transports)
        self._by_scheme: dict[str, PeerTransport] = {}
        for name, transport in self.transports.items():
            for scheme in _SCHEMES.get(name, (name,)):
                self._by_scheme.setdefault(scheme, transport)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.transports)})"

    def pick(self, address: str) -> tuple[PeerTransport, str] | None:
        """The first of ``address``'s URLs this node speaks, with its transport."""
        for url in split_address(address):
            transport = self._by_scheme.get(_scheme(url))
            if transport is not None:
                return transport, url
        return None

    def speaks(self, address: str) -> bool:
        return self.pick(address) is not None

    async def connect(self, address: PeerAddress) -> PeerClient:
        self._check_open()
        picked = self.pick(address.url)
        if picked is None:
            log.debug("No transport of this node speaks %s; skipped", address.url)
            raise TransportError(
                f"no transport of this node ({', '.join(self.transports)}) speaks {address.url}"
            )
        transport, url = picked
        return await transport.connect(PeerAddress(url, address.node_id))

    def asgi_app(self, handler: RequestHandler, blobs: BlobSource) -> Any | None:
        for transport in self.transports.values():
            app = transport.asgi_app(handler, blobs)
            if app is not None:
                return app
        return None

    def listeners(self) -> list[tuple[str, PeerTransport]]:
        """The transports that listen on their own (not in the node's HTTP server)."""
        return [
            (name, t)
            for name, t in self.transports.items()
            if type(t).serve is not PeerTransport.serve
        ]

    async def aclose(self) -> None:
        if self._closed:
            return
        await super().aclose()
        for transport in self.transports.values():
            await transport.aclose()


def transport_names(spec: str | Sequence[str]) -> list[str]:
    """``"http,quic"`` -> ``["http", "quic"]`` (order kept, duplicates dropped)."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    if not names:
        raise UsageError("name at least one peer transport, e.g. --transport http,quic")
    return names


def create_transports(
    spec: str | Sequence[str], options: Mapping[str, Mapping[str, str]] | None = None
) -> TransportSet:
    """Create the named transport plugins (``pyrsia.transport`` entry points)."""
    from pyrsia_core import plugins

    names = transport_names(spec)
    unused = sorted(set(options or {}) - set(names))
    if unused:
        raise UsageError(
            f"--transport-option for {', '.join(unused)}, but the node uses only "
            f"{', '.join(names)} (add it with --transport {','.join([*names, *unused])})"
        )
    created: dict[str, PeerTransport] = {}
    for name in names:  # transports open nothing until used
        created[name] = plugins.create(
            "pyrsia.transport", name, dict((options or {}).get(name, {}))
        )
    return TransportSet(created)
