"""Output for people at a terminal: aligned tables, and a progress line on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

__all__ = ["ProgressLine", "format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns as wide as their widest cell, two spaces apart; the last one not padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for cells in (headers, *rows):
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*padded, cells[-1]]).rstrip())
    return "\n".join(lines)


class ProgressLine:
    """``progress(stage, done, total)`` redrawn in place on ``stream`` when it is a terminal
    (at most 10 times a second); nothing at all otherwise. :meth:`close` erases it."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._shown = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        pct = f" ({100 * done // total}%)" if total else ""
        self.stream.write(f"\r\x1b[K{self.label}: {stage} {done}/{total}{pct}")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
