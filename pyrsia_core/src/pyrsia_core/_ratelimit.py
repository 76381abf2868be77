"""A token bucket for upload bandwidth (sans-I/O: the caller sleeps)."""

from __future__ import annotations

import attrs

__all__ = ["TokenBucket"]


@attrs.define(eq=False)
class TokenBucket:
    """``rate`` bytes per second with bursts of up to ``burst`` bytes.

    :meth:`reserve` takes ``n`` bytes' worth of tokens at ``now`` (the balance may go
    negative) and returns how long the caller must wait before sending them, so
    the long-run rate never exceeds ``rate`` however the sends are sized.
    """

    rate: float
    burst: float
    _tokens: float = attrs.field(init=False)
    _last: float | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if self.rate <= 0 or self.burst <= 0:
            raise ValueError("rate and burst must be positive")
        self._tokens = self.burst

    def reserve(self, n: int, now: float) -> float:
        if n < 0:
            raise ValueError("cannot reserve a negative amount")
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
