"""How ``pyrsia node start`` logs: text or JSON lines, to stderr or appended to a file."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import logging.handlers
import sys
from typing import Any

from ._config import ConfigError

__all__ = ["JsonFormatter", "add_log_options", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)-5s %(name)s > %(message)s"
#: The attributes every LogRecord has; anything else came from ``extra=`` and is a field.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, the record's ``extra=`` fields, and ``exception`` (its traceback text)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value if isinstance(value, str | int | float | bool) or (
                    value is None) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def add_log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="text lines (default), or one JSON object per line (time, level, "
                        "logger, message and fields such as image, digest, source)")
    parser.add_argument("--log-file", metavar="PATH",
                        help="append the log to PATH instead of stderr (stderr then only gets "
                        "errors that stop the node from starting)")


def configure_logging(level: str, fmt: str = "text", file: str | None = None) -> None:
    """Send the root logger's records at ``level`` to stderr or (appending) to ``file``."""
    handler: logging.Handler
    if file:
        try:
            # Reopens the file when logrotate moves it away.
            handler = logging.handlers.WatchedFileHandler(file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot open the log file {file}: {exc.strerror or exc}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
