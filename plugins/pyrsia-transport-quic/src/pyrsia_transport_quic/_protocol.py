"""What the two sides say on a stream: one exchange per client-initiated bidirectional stream.

Requests (client to server)::

    b"R" <frame bytes> FIN                                  -- a request frame
    b"B" <offset u64> <credit u64> <n u8> <digest, n ASCII bytes> {<credit u64>}
                                                            -- a blob from ``offset``

Blob bodies are flow-controlled by the application, not only by QUIC: the server sends
at most ``credit`` body bytes, and the client raises its (absolute) credit as its
consumer takes the bytes. Memory therefore stays within one window on both sides,
however slowly the consumer writes, while QUIC's own windows are set large enough that
they never bind.

Replies (server to client): a status byte, then::

    OK        reply frame FIN            | blob: <size u64, 2**64-1 = unknown> body FIN
    ERROR     UTF-8 text FIN             -- the handler or the blob source failed
    NOT_FOUND FIN                        -- the node does not serve that blob
    TOO_LARGE UTF-8 text FIN             -- the request frame exceeds the cap
    RANGE     <size u64> FIN             -- the offset lies beyond the blob

A server whose blob source breaks its word mid-body resets the stream, so the client
sees a failed body, never a wrong one.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "ALPN",
    "BLOB",
    "ERROR",
    "NOT_FOUND",
    "OK",
    "RANGE",
    "RPC",
    "TOO_LARGE",
    "U64",
    "UNKNOWN_SIZE",
    "blob_request",
]

ALPN: Final = "pyrsia-p2p/1"
RPC: Final = b"R"
BLOB: Final = b"B"
OK: Final = 0
ERROR: Final = 1
NOT_FOUND: Final = 2
TOO_LARGE: Final = 3
RANGE: Final = 4
UNKNOWN_SIZE: Final = 2**64 - 1
U64: Final = struct.Struct("!Q")
#: ``B``, offset, credit, digest length.
BLOB_HEADER: Final = struct.Struct("!cQQB")


def blob_request(digest: str, offset: int, credit: int) -> bytes:
    name = digest.encode("ascii")
    return BLOB_HEADER.pack(BLOB, offset, credit, len(name)) + name
