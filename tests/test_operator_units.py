"""Unit tests of the operator pieces that need no process: readiness reasons, JSON log lines."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from pyrsia_cli._logging import JsonFormatter
from pyrsia_registry._health import readiness


class _Store:
    def __init__(self, *, closed: bool = False, fails: bool = False) -> None:
        self.closed = closed
        self.fails = fails

    async def get(self, key: bytes) -> bytes | None:
        if self.fails:
            raise OSError("disk gone")
        return None


def _node(*, kv: _Store | None = None, blobs: _Store | None = None, peers: Any = None,
          height: int = 3) -> Any:
    return SimpleNamespace(kv=kv or _Store(), blobs=blobs or _Store(), peers=peers,
                           log_store=SimpleNamespace(ledger=SimpleNamespace(height=height)))


def _peers(*, bootstrapped: bool = True, stats: dict[str, Any] | None = None,
           heads: dict[str, int] | None = None, configured: tuple[str, ...] = ("http://a",),
           listen_only: bool = False) -> Any:
    return SimpleNamespace(bootstrapped=bootstrapped, stats=stats if stats is not None else
                           {"a" * 64: object()}, last_heads=heads or {},
                           config=SimpleNamespace(peers=configured, listen_only=listen_only))


@pytest.mark.anyio
@pytest.mark.parametrize("node, reason", [
    (_node(kv=_Store(closed=True)), "stores are closed"),
    (_node(blobs=_Store(closed=True)), "stores are closed"),
    (_node(kv=_Store(fails=True)), "does not answer: disk gone"),
    (_node(peers=_peers(bootstrapped=False)), "bootstrap has not finished"),
    (_node(peers=_peers(stats={})), "none of the configured peers (http://a)"),
    (_node(peers=_peers(heads={"b" * 64: 5})), "behind: height 3, peer(s) bbbbbbbbbbbbbbbb "
                                               "reported 5"),
])
async def test_not_ready(node: Any, reason: str) -> None:
    ready, details = await readiness(node)
    assert not ready and details["status"] == "not ready"
    assert reason in details["reason"]


@pytest.mark.anyio
@pytest.mark.parametrize("node", [
    _node(),  # no peer service at all
    _node(peers=_peers(heads={"b" * 64: 3, "c" * 64: 2})),  # nobody is ahead
    _node(peers=_peers(stats={}, configured=())),  # a network of one
    _node(peers=_peers(bootstrapped=False, stats={}, listen_only=True)),  # never dials out
])
async def test_ready(node: Any) -> None:
    ready, details = await readiness(node)
    assert ready and details["status"] == "ready" and details["ledger_height"] == 3


def test_json_formatter_fields_and_exceptions() -> None:
    fmt = JsonFormatter()
    record = logging.LogRecord("pyrsia.oci", logging.INFO, __file__, 1, "Blob %s of %s",
                               ("sha256:ab", "library/alpine"), None)
    record.image = "library/alpine"
    record.size = 12
    out = json.loads(fmt.format(record))
    assert out["message"] == "Blob sha256:ab of library/alpine"
    assert (out["level"], out["logger"], out["image"], out["size"]) == (
        "INFO", "pyrsia.oci", "library/alpine", 12)
    assert out["time"].endswith("Z") and "T" in out["time"]
    assert "args" not in out and "msg" not in out
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = fmt.format(failed)
    assert "\n" not in line  # one object per line, even with a multi-line traceback
    assert "ValueError: boom" in json.loads(line)["exception"]
