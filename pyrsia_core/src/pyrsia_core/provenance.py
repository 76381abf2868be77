"""Where the bytes of the artifact a request is serving came from (for its log line, the
node's metrics and status page).

The code that fetches an artifact for a request (from a peer, from the upstream) calls
:func:`note`; a package type's app (the OCI app) asks :func:`take` once the artifact is
local, in the same task (a context variable: concurrent requests never see each other's
notes).

The node's app also opens a :class:`Pull` around each request to a package mount
(:func:`begin`): every note made for that request (and by a build it starts, which runs
in a copy of its context) is kept there too, so the request's metrics and the status page
can say where its bytes came from (cache, peer, upstream or build) once it is answered.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token

__all__ = ["Pull", "begin", "building", "end", "note", "stored", "take"]

_SOURCE: ContextVar[str | None] = ContextVar("pyrsia_artifact_source", default=None)
_STORED: ContextVar[int] = ContextVar("pyrsia_stored_size", default=0)

#: Sources by rank: a later note of a lower rank does not replace a higher one.
_RANK = {"cache": 0, "peer": 1, "upstream": 1, "build": 2}


class Pull:
    """What one request to a package mount learned about where its bytes came from."""

    __slots__ = ("detail", "kind", "on_fetched")

    def __init__(self, on_fetched: Callable[[str, int], None] | None = None) -> None:
        self.kind = "cache"  # cache | peer | upstream | build
        self.detail = ""  # the peer's node id(s), the upstream's URL
        #: ``(kind, bytes)`` for every artifact fetched for this request, when fetched.
        self.on_fetched = on_fetched

    @property
    def source(self) -> str:
        return f"{self.kind} {self.detail}" if self.detail else self.kind

    def noted(self, kind: str, detail: str, size: int) -> None:
        if _RANK.get(kind, 0) >= _RANK.get(self.kind, 0):
            self.kind, self.detail = kind, detail
        if size and self.on_fetched is not None:
            self.on_fetched(kind, size)


_PULL: ContextVar[Pull | None] = ContextVar("pyrsia_pull", default=None)


def _parse(source: str) -> tuple[str, str]:
    """``"pulled from peer ab12, cd34"`` -> ``("peer", "ab12, cd34")``."""
    text = source.removeprefix("pulled from ").strip()
    kind, _, detail = text.partition(" ")
    return (kind, detail) if kind in _RANK else ("upstream", text)


def note(source: str, size: int | None = None) -> None:
    """Record that this request's artifact was just ``source`` (``"pulled from peer X"``),
    ``size`` bytes (by default: the size of the blob this task stored last)."""
    _SOURCE.set(source)
    pull = _PULL.get()
    if pull is not None:
        kind, detail = _parse(source)
        pull.noted(kind, detail, _STORED.get() if size is None else size)
    _STORED.set(0)


def take() -> str | None:
    """The latest :func:`note` of this task (and forget it), or ``None``: nothing fetched."""
    source = _SOURCE.get()
    if source is not None:
        _SOURCE.set(None)
    return source


def stored(size: int) -> None:
    """The node stored a verified blob of ``size`` bytes in this task (for :func:`note`)."""
    _STORED.set(size)


def building() -> None:
    """This request waits for (or started) a build of its package."""
    pull = _PULL.get()
    if pull is not None:
        pull.noted("build", "", 0)


def begin(pull: Pull) -> Token[Pull | None]:
    """Collect this task's notes (and those of tasks it starts) in ``pull``."""
    _SOURCE.set(None)
    return _PULL.set(pull)


def end(token: Token[Pull | None]) -> None:
    _PULL.reset(token)
