"""Where the bytes of the artifact a request is serving came from, for its log line.

The code that fetches an artifact for a request (from a peer, from the upstream) calls
:func:`note`; the OCI app asks :func:`take` once the artifact is local, in the same task
(a context variable: concurrent requests never see each other's notes).
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["note", "take"]

_SOURCE: ContextVar[str | None] = ContextVar("pyrsia_artifact_source", default=None)


def note(source: str) -> None:
    """Record that this request's artifact was just ``source`` (``"pulled from peer X"``)."""
    _SOURCE.set(source)


def take() -> str | None:
    """The latest :func:`note` of this task (and forget it), or ``None``: nothing fetched."""
    source = _SOURCE.get()
    if source is not None:
        _SOURCE.set(None)
    return source
