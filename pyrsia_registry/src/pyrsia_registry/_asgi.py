"""The ASGI helpers of :mod:`pyrsia_core.asgi`, under the names the node's modules use."""

from pyrsia_core.asgi import (
    MAX_BODY,
    ASGIApp,
    Headers,
    Receive,
    Scope,
    Send,
    header_values,
    read_body,
    route_path,
    send_bytes,
    send_file,
    send_json,
    send_stream,
)

__all__ = [
    "MAX_BODY",
    "ASGIApp",
    "Headers",
    "Receive",
    "Scope",
    "Send",
    "header_values",
    "read_body",
    "route_path",
    "send_bytes",
    "send_file",
    "send_json",
    "send_stream",
]
