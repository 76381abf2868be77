"""Test only: a package type that misbehaves in every way a plugin can.

Its app (mounted at ``/bad``) raises, hangs, sends malformed ASGI messages, breaks
off a started response, or returns without answering -- by path. Its builds yield
garbage, raise or hang -- by package id (``garbage:1``, ``raise:1``, ``hang:1``,
``wrongdigest:1``). ``/bad/ok`` and ``ok:1`` behave.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
from pyrsia_core.interfaces import ASGIApp, BuiltArtifact, PackageHost, PackageType

from pyrsia_core import Digest

__all__ = ["BadPackageType"]


class BadPackageType(PackageType):
    name = "bad"
    record_type = "Bad"
    mount_path = "/bad"

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> BadPackageType:
        return cls()

    def parse_package_id(self, text: str) -> str:
        if text == "crash:1":
            raise KeyError("parse_package_id crashed")
        name, sep, version = text.partition(":")
        if not sep or not name.isalpha() or not version.isdigit():
            raise ValueError(f"invalid bad package id {text!r:.80}")
        return text

    def references(self, content: bytes, media_type: str) -> list[tuple[Digest, str]]:
        raise ValueError("bad packages have no manifests")

    def asgi_app(self, host: PackageHost) -> ASGIApp:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            path = scope["path"][len(scope.get("root_path", "")):]
            if path == "/ok":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"fine"})
            elif path == "/raise":
                raise RuntimeError("the bad plugin raised on purpose")
            elif path == "/hang":
                await anyio.sleep_forever()
            elif path == "/garbage":
                await send({"type": "http.response.start", "status": "banana"})
            elif path == "/notdict":
                await send("not an ASGI message")
            elif path == "/badheaders":
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"x-evil", b"a\r\nInjected: 1")]})
            elif path == "/half":
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-length", b"100")]})
                await send({"type": "http.response.body", "body": b"x" * 10,
                            "more_body": True})
                raise RuntimeError("the bad plugin broke off its response")
            elif path == "/nothing":
                return
            else:
                await send({"type": "http.response.start", "status": 404, "headers": []})
                await send({"type": "http.response.body", "body": b""})

        return app

    async def _build(
        self, package_id: str, artifact_ids: Sequence[str]
    ) -> AsyncIterator[BuiltArtifact]:
        kind = package_id.partition(":")[0]
        if kind == "ok":
            yield BuiltArtifact("ok.txt", Digest.of(b"ok"), b"ok")
        elif kind == "garbage":
            yield "not an artifact"  # type: ignore[misc]
        elif kind == "wrongdigest":
            yield BuiltArtifact("a.txt", Digest.of(b"something else"), b"a")
        elif kind == "raise":
            raise ZeroDivisionError("the bad plugin's build raised on purpose")
        elif kind == "hang":
            await anyio.sleep_forever()
            yield BuiltArtifact("never", Digest.of(b""), b"")  # pragma: no cover
