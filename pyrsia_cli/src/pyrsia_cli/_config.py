"""The CLI's own configuration: where the node is, and the disk space to allocate."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "CliConfig",
    "ConfigError",
    "config_path",
    "parse_node_address",
    "validate_host",
    "validate_port",
]

_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


class ConfigError(ValueError):
    pass


def config_path() -> Path:
    explicit = os.environ.get("PYRSIA_CLI_CONFIG")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "pyrsia" / "cli.json"


def validate_host(text: str) -> str:
    text = text.strip()
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(text):
        raise ConfigError(f"invalid host {text!r}: enter a hostname or an IP address")
    return text


def validate_port(text: str | int) -> int:
    try:
        port = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"invalid port {text!r}: enter a number from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"invalid port {port}: enter a number from 1 to 65535")
    return port


def validate_disk_space(text: str) -> str:
    from pyrsia_registry import parse_size  # the node's own parser (imported lazily)

    try:
        parse_size(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # UsageError from the registry
        raise ConfigError(str(exc)) from None
    return " ".join(text.split())


def parse_node_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:7889"``, ``"http://host:7889"``, ``"[::1]:7889"`` or ``"host"`` (port
    7888) -> ``(host, port)``."""
    raw = text.strip()
    rest = raw.removeprefix("http://")
    if "://" in rest:
        raise ConfigError(f"invalid node address {raw!r}: the node API is plain http://")
    rest = rest.rstrip("/")
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]")
        port_text = port_text.removeprefix(":") if sep else "x"
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host, port_text = rest, ""
    try:
        return validate_host(host), validate_port(port_text) if port_text else 7888
    except ConfigError as exc:
        raise ConfigError(f"invalid node address {raw!r}: {exc}") from None


@attrs.define
class CliConfig:
    host: str = "localhost"
    port: int = 7888
    disk_allocated: str = "10 GB"
    #: Where host and port came from (for error messages); not saved.
    source: str = attrs.field(default="the default", eq=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def load(cls, path: Path | None = None) -> CliConfig:
        path = path or config_path()
        try:
            data: Any = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read CLI configuration {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"CLI configuration {path} is not a JSON object")
        cfg = cls()
        try:
            if "host" in data:
                cfg.host = validate_host(str(data["host"]))
            if "port" in data:
                cfg.port = validate_port(data["port"])
            if "disk_allocated" in data:
                cfg.disk_allocated = validate_disk_space(str(data["disk_allocated"]))
        except ConfigError as exc:
            raise ConfigError(f"CLI configuration {path}: {exc}") from None
        return cfg

    def save(self, path: Path | None = None) -> Path:
        path = path or config_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        data = {"host": self.host, "port": self.port, "disk_allocated": self.disk_allocated}
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
        return path
