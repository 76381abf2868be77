"""pyrsia-transport-http: the Pyrsia peer transport over HTTP/1.1.

Peers talk HTTP/1.1 on each node's own HTTP port, under ``/p2p``:

* ``POST /p2p/rpc``: one core-encoded frame in, the reply frame out (at most 16 MiB each);
* ``GET|HEAD /p2p/blobs/sha256:<hex>``: a blob, or its tail with ``Range: bytes=N-``.

:class:`HttpTransport` is the :class:`~pyrsia_core.interfaces.PeerTransport`: its clients
share one pooled ``httpx.AsyncClient``, and :meth:`HttpTransport.asgi_app` gives the ASGI
app (:class:`PeerApp`) the node mounts at ``/p2p``. Registered as ``http`` in the
``pyrsia.transport`` entry-point group; the factory takes ``timeout`` and
``max_connections`` (both optional).

:class:`PlainHttpTransport` is the httpx transport under its client for ``http://``
peers (and under the Docker plugin's client for a plain-HTTP upstream): it reads bodies
of known length straight into 1 MiB buffers.
"""

from __future__ import annotations

from ._app import BlobSourceError, PeerApp
from ._client import BlobBody, HttpPeerClient, HttpTransport
from ._limits import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_FRAME_SIZE, MIN_CHUNK_SIZE, PREFIX
from ._plain import PlainHttpTransport

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_FRAME_SIZE",
    "MIN_CHUNK_SIZE",
    "PREFIX",
    "BlobBody",
    "BlobSourceError",
    "HttpPeerClient",
    "HttpTransport",
    "PeerApp",
    "PlainHttpTransport",
    "__version__",
]
