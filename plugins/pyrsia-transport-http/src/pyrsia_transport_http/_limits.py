"""Sizes and names shared by the client and the server side."""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_FRAME_SIZE",
    "MIN_CHUNK_SIZE",
    "PREFIX",
    "SENDFILE",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB

#: Largest request or reply frame, in bytes, either side accepts (DESIGN §6).
MAX_FRAME_SIZE: Final = 16 * MiB
#: Size of the chunks a blob body yields to the caller (the last one may be shorter).
DEFAULT_CHUNK_SIZE: Final = 1 * MiB
MIN_CHUNK_SIZE: Final = 256 * KiB
MAX_CHUNK_SIZE: Final = 1 * MiB

#: Where the node mounts the peer app on its own HTTP port.
PREFIX: Final = "/p2p"

#: The ASGI scope extension / message type of zero-copy file ranges (``pyrsia_registry``'s
#: server offers it; any ASGI server may).
SENDFILE: Final = "pyrsia.sendfile"
