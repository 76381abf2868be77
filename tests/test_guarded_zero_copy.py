"""A package type's app may answer with zero copy (``send_verified_blob``), and the node's
guard checks those messages as it checks the others: a well-formed ``pyrsia.sendfile``
the server offers passes through and ends the response; a malformed one, or one the
server does not offer, fails that request with the plugin's name -- nothing else."""

from __future__ import annotations

from typing import Any

import pytest
from pyrsia_core.interfaces import memory_blob, send_verified_blob
from pyrsia_registry._packages import GuardedApp

SCOPE: dict[str, Any] = {"type": "http", "method": "GET", "path": "/x/y", "root_path": "/x",
                         "extensions": {"pyrsia.sendfile": {}}}


async def _call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await GuardedApp(app, "zc (test)", 5.0)(scope, receive, send)
    return sent


def _sendfile_app(message: dict[str, Any]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"5")]})
        await send(message)

    return app


@pytest.mark.anyio
async def test_a_well_formed_sendfile_passes_through() -> None:
    sent = await _call(_sendfile_app({"type": "pyrsia.sendfile", "path": "/tmp/blob",
                                      "offset": 0, "count": 5}), SCOPE)
    assert [m["type"] for m in sent] == ["http.response.start", "pyrsia.sendfile"]
    assert sent[1] == {"type": "pyrsia.sendfile", "path": "/tmp/blob", "offset": 0, "count": 5}


@pytest.mark.anyio
@pytest.mark.parametrize("message", [
    {"type": "pyrsia.sendfile", "path": "/tmp/blob", "offset": -1, "count": 5},
    {"type": "pyrsia.sendfile", "path": "/tmp/blob", "offset": 0, "count": "5"},
    {"type": "pyrsia.sendfile", "path": "", "offset": 0, "count": 5},
    {"type": "pyrsia.sendfile", "path": "/tmp/\0blob", "offset": 0, "count": 5},
    {"type": "http.response.pathsend", "path": "/tmp/blob"},  # not offered by this server
])
async def test_a_bad_or_unoffered_zero_copy_message_breaks_off_the_response(
    message: dict[str, Any],
) -> None:
    sent = await _call(_sendfile_app(message), SCOPE)
    # Headers were out: the response ends unfinished (the server closes the connection),
    # and nothing malformed reached the server.
    assert [m["type"] for m in sent] == ["http.response.start"]


@pytest.mark.anyio
async def test_send_verified_blob_streams_without_the_extension_and_sends_ranges() -> None:
    blob = memory_blob(b"0123456789")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send_verified_blob(scope, send, 206, [(b"content-length", b"4")], blob,
                                 offset=3, length=4)

    sent = await _call(app, {**SCOPE, "extensions": {}})
    assert sent[0]["status"] == 206
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"3456"
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    head = await _call(app, {**SCOPE, "method": "HEAD", "extensions": {}})
    assert b"".join(m.get("body", b"") for m in head[1:]) == b""
