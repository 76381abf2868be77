"""Node configuration: defaults, parsing of sizes, the data directory."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import attrs
from pyrsia_core.errors import UsageError

__all__ = [
    "MAX_DISK_SPACE",
    "NodeConfig",
    "default_data_dir",
    "format_size",
    "load_settings",
    "parse_rate",
    "parse_size",
    "save_settings",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7888
DEFAULT_UPSTREAM = "https://registry-1.docker.io"
DEFAULT_DISK_SPACE = "10 GB"
#: The largest disk space a node accepts (1 EB: more than any file system holds).
MAX_DISK_SPACE = 10**18
#: The node's own settings in its data dir (set with ``pyrsia config``; survive restarts).
SETTINGS_FILE = "settings.json"
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """``"10 GB"`` -> bytes. Units are required (as the seed's prompt says)."""
    m = _SIZE.fullmatch(text or "")
    if not m:
        raise UsageError(
            f"invalid size {text!r}: enter a number with units, e.g. '10 GB' "
            "(units: B, KB, MB, GB, TB)"
        )
    value = float(m[1]) * _UNITS[m[2].upper()]
    if value <= 0:
        raise UsageError(f"size {text!r} must be greater than zero")
    if value > MAX_DISK_SPACE:
        raise UsageError(f"size {text!r} is larger than any disk (at most 1000000 TB)")
    return int(value)


_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*/\s*s\s*", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """``"10MB/s"`` -> bytes per second."""
    m = _RATE.fullmatch(text or "")
    if not m:
        raise UsageError(f"invalid rate {text!r}: use a size per second, e.g. '10MB/s'")
    return float(parse_size(f"{m[1]} {m[2]}"))


def format_size(n: int) -> str:
    """``1536`` -> ``"1.54 KB"``: sizes as the CLI prints them (decimal units)."""
    for unit in ("TB", "GB", "MB", "KB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.2f} {unit}"
    return f"{n} B"


def default_data_dir() -> Path:
    """``$PYRSIA_HOME`` if set, else the user's data directory (``~/.local/share/pyrsia``)."""
    home = os.environ.get("PYRSIA_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "pyrsia"


def load_settings(data_dir: Path) -> dict[str, Any]:
    """The settings saved in a node's data dir (``{}`` if none); a broken file is an error."""
    path = Path(data_dir) / SETTINGS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the node settings {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"the node settings {path} are not a JSON object")
    disk = data.get("disk_space")
    if disk is not None and (type(disk) is not int or not 0 < disk <= MAX_DISK_SPACE):
        raise UsageError(f"the node settings {path} hold an invalid disk_space {disk!r}")
    return data


def save_settings(data_dir: Path, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into the node's saved settings (written atomically); the result."""
    path = Path(data_dir) / SETTINGS_FILE
    try:
        data = load_settings(data_dir)
    except UsageError:
        data = {}  # a broken file is replaced by the new settings
    data.update(changes)
    tmp = path.with_name(SETTINGS_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return data


@attrs.define
class NodeConfig:
    """Everything a node is started with; the CLI's ``pyrsia node start`` options map onto it."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = attrs.field(factory=default_data_dir, converter=Path)
    upstream: str | None = DEFAULT_UPSTREAM
    #: Bytes of disk for artifacts. ``None``: the node's saved setting (``pyrsia config``),
    #: else 10 GB. A value given here is saved as the node's setting.
    disk_space: int | None = None
    kv_store: str = "leveldb"
    blob_store: str = "fs"
    peers: tuple[str, ...] = ()
    build_node: bool = True
    #: Peer transport plugin(s), comma-separated: "http", "quic" or "http,quic".
    transport: str = "http"
    #: UDP port of the QUIC transport (None: the same number as ``port``; 0: a free one).
    quic_port: int | None = None
    listen_only: bool = False
    no_serve: bool = False
    max_upload_rate: float | None = None  # bytes per second
    public_url: str = ""
    sync_interval: float = 5.0
    #: Per package-type plugin config (``{"maven": {"upstream": URL}}``), given to its factory.
    package_options: dict[str, dict[str, str]] = attrs.Factory(dict)
    #: Config of transport plugins by name (``{"quic": {"max_datagram_size": "8192"}}``).
    transport_options: dict[str, dict[str, str]] = attrs.Factory(dict)
    #: Seconds a package-type plugin may take to build or to answer (then it fails alone).
    plugin_timeout: float = 120.0
    #: Seconds a build waits for the build nodes' quorum before it fails.
    consensus_timeout: float = 120.0
    #: Seconds a new node joining ``peers`` keeps asking them for the network's genesis.
    join_timeout: float = 30.0
    #: Further Host header names the node API answers for (``NAME`` or ``NAME:PORT``),
    #: besides its listen host and localhost with its port (``--allowed-host``).
    allowed_hosts: tuple[str, ...] = ()
    #: Config of the upstream plugin (``{"min_rate": "4096"}``), besides its URL.
    upstream_options: dict[str, str] = attrs.Factory(dict)
    #: Act as a witness for the network (``--witness-key``): its own Ed25519 key in the
    #: data dir (``witness.key``), answering ``POST /witness/add-checkpoint``.
    witness_key: bool = False
    #: Witnesses this build node asks to cosign every block (``--witness URL,KEY``):
    #: :class:`~pyrsia_registry._witness.WitnessTarget` values.
    witnesses: tuple[Any, ...] = ()
    #: Trust checkpoints only with enough witness cosignatures (``--witness-policy`` and
    #: ``--witness-threshold``): a :class:`~pyrsia_core.WitnessPolicy`, or ``None``.
    witness_policy: Any = None

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port {self.port} is not in 0..65535")
        if self.quic_port is not None and not 0 <= self.quic_port <= 65535:
            raise UsageError(f"QUIC port {self.quic_port} is not in 0..65535")
        if self.disk_space is not None and not 0 < self.disk_space <= MAX_DISK_SPACE:
            raise UsageError(f"disk space {self.disk_space} is not in 1..{MAX_DISK_SPACE} bytes")
        if self.consensus_timeout <= 0:
            raise UsageError("the consensus timeout must be greater than zero")
        if self.upstream is not None and not self.upstream.startswith(("http://", "https://")):
            raise UsageError(f"upstream {self.upstream!r} must be an http:// or https:// URL")
