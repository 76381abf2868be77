"""Who may talk to the node API: the Host header and the content type of POSTs.

A web page the node's user visits can send requests to ``127.0.0.1:<port>`` (a
cross-site ``POST`` of ``text/plain`` needs no CORS preflight), and through DNS
rebinding it can even read the answers: its own host name then resolves to the
node. Two rules close both doors for the node API (``/api/*``):

* the ``Host`` header must name the node itself: its listen host, ``localhost``,
  ``127.0.0.1`` or ``[::1]`` (with the port the request came in on, or none), or a name the
  operator allowed (``--allowed-host NAME`` or ``NAME:PORT``); otherwise 421;
* a ``POST`` must be ``Content-Type: application/json``, which a page can only
  send after a CORS preflight the node never grants (it sends no CORS headers);
  otherwise 415.

The OCI API (``/v2``) and the peer endpoint (``/p2p``) keep serving any host
name: registry clients and peers use whatever name reaches the node.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._asgi import Scope, header_values

__all__ = ["api_request_problem", "host_allowed", "json_problem"]

_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


def _split_host(value: str) -> tuple[str, int | None]:
    """``"Name:8080"`` -> ``("name", 8080)``; ``"[::1]"`` -> ``("[::1]", None)``."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, None
        host, rest = value[: end + 1], value[end + 1 :]
    else:
        host, sep, rest = value.partition(":")
        rest = ":" + rest if sep else ""
    if not rest:
        return host.rstrip("."), None
    if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6:
        return host, -1  # a malformed port matches nothing
    return host.rstrip("."), int(rest[1:])


def host_allowed(host_header: str, *, listen_host: str, port: int | None,
                 allowed: Iterable[str] = ()) -> bool:
    """Whether ``host_header`` names this node (see the module docstring)."""
    host, hport = _split_host(host_header)
    if not host or hport == -1:
        return False
    listen = listen_host.strip().lower()
    if ":" in listen and not listen.startswith("["):
        listen = f"[{listen}]"
    own = {listen, *_LOOPBACK} - {"0.0.0.0", "[::]", ""}
    # Without a port: browsers always send a non-default port, so only other clients
    # leave it out (a rebinding page's Host is its own name, never these).
    if host in own and (hport is None or hport == port):
        return True
    for entry in allowed:
        name, aport = _split_host(entry)
        if name == host and (aport is None or aport == hport):
            return True
    return False


def api_request_problem(scope: Scope, *, listen_host: str,
                        allowed: Iterable[str] = ()) -> tuple[int, str] | None:
    """``(status, message)`` if the node API must refuse this request's Host, else ``None``."""
    server = scope.get("server")
    port = int(server[1]) if isinstance(server, (tuple, list)) and len(server) >= 2 and (
        server[1] is not None) else None
    hosts = header_values(scope, "host")
    if len(hosts) != 1 or not host_allowed(hosts[0], listen_host=listen_host, port=port,
                                           allowed=allowed):
        shown = hosts[0][:100] if hosts else "(none)"
        return 421, (f"the node API does not answer for host {shown!r}: use the node's own "
                     "address (or start it with --allowed-host NAME)")
    return None


def json_problem(scope: Scope) -> str | None:
    """Why a POST to the node API is refused (415), if it is not ``application/json``."""
    types = header_values(scope, "content-type")
    media = types[0].partition(";")[0].strip().lower() if len(types) == 1 else ""
    if media != "application/json":
        return "POST requests to the node API must be Content-Type: application/json"
    return None
