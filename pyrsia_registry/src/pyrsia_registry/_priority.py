"""Consensus first: bulk work steps aside while the build nodes decide a height.

A round of consensus is three message hops (proposal, prevotes, precommits) between
build nodes. On a build node busy with builds, every hop waits behind the event loop's
other work (blob fetches, hashing, stores), and on shared cores behind the other
nodes' work too: a round that takes about 50 ms idle took 150-800 ms under a queue
of builds. So, like Tendermint's prioritised consensus channel, a build node holds
its *bulk* work -- its own builds and background rebuilds of other nodes' builds --
from the moment it sees the height's proposal until the block commits (at most
``hold_max`` seconds, so a stalled height never starves the builds).

The rebuild a validator's vote waits for is not bulk: it runs inside
:func:`urgent` and never waits here.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import attrs
from pyrsia_core.interfaces import SystemClock

__all__ = ["ConsensusPriority", "urgent"]

_URGENT: contextvars.ContextVar[bool] = contextvars.ContextVar("pyrsia_urgent", default=False)


@contextmanager
def urgent() -> Iterator[None]:
    """Work in this context (and the tasks it starts) never yields to consensus."""
    token = _URGENT.set(True)
    try:
        yield
    finally:
        _URGENT.reset(token)


@attrs.define(eq=False)
class ConsensusPriority:
    """A gate bulk work passes through; consensus closes it for one height at a time."""

    clock: SystemClock = attrs.Factory(SystemClock)
    #: The longest one height holds bulk work, in seconds.
    hold_max: float = 0.3
    _until: float = 0.0
    _held: int = -1  # the height last held: each height holds once
    _open: anyio.Event | None = None

    @property
    def holding(self) -> bool:
        return self._until > self.clock.monotonic()

    def hold(self, height: int) -> None:
        """A proposal for ``height`` is out: hold bulk work until it commits."""
        if height == self._held:
            return
        self._held = height
        self._until = self.clock.monotonic() + self.hold_max

    def release(self) -> None:
        """The height committed (or was given up): bulk work goes on."""
        self._until = 0.0
        if self._open is not None:
            self._open.set()
            self._open = None

    async def wait(self) -> None:
        """Return once bulk work may go on (at once in :func:`urgent` work)."""
        if _URGENT.get():
            return
        while (remaining := self._until - self.clock.monotonic()) > 0:
            if self._open is None:
                self._open = anyio.Event()
            with anyio.move_on_after(remaining):
                await self._open.wait()
