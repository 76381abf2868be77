"""pyrsia-transport-quic: the Pyrsia peer transport over QUIC (aioquic, driven from anyio).

Peers talk QUIC with TLS 1.3 on a UDP port of their own (``quic://host:port``): one
bidirectional stream per exchange, a request frame and its reply, or a blob (or its tail
from an offset) streamed under an application-level credit window so memory stays flat
on both sides. Each node generates a self-signed certificate; peers are authenticated
by their signed frames, not by TLS.

:class:`QuicTransport` is the :class:`~pyrsia_core.interfaces.PeerTransport`: its clients
share one connection per peer, and :meth:`QuicTransport.serve` listens. Registered as
``quic`` in the ``pyrsia.transport`` entry-point group; the factory takes ``host``,
``port``, ``timeout``, ``idle_timeout``, ``window`` and ``max_datagram_size`` (all
optional).
"""

from __future__ import annotations

from ._transport import (
    DEFAULT_WINDOW,
    MAX_CHUNK_SIZE,
    MAX_FRAME_SIZE,
    BlobSourceError,
    QuicBlobBody,
    QuicPeerClient,
    QuicTransport,
    parse_address,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_CHUNK_SIZE",
    "MAX_FRAME_SIZE",
    "BlobSourceError",
    "QuicBlobBody",
    "QuicPeerClient",
    "QuicTransport",
    "__version__",
    "parse_address",
]
