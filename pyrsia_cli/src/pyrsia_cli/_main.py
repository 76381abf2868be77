"""``pyrsia``: run a node, configure the CLI, ask the node about its log and builds."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import httpx

from ._config import (
    CliConfig,
    ConfigError,
    config_path,
    validate_disk_space,
    validate_host,
    validate_port,
)

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
#: Package types the CLI knows, and the option naming a package of each.
ID_OPTIONS: dict[str, str] = {"docker": "image", "maven": "gav"}
PACKAGE_TYPES = list(ID_OPTIONS)


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    raise CliError(message, code)


# --------------------------------------------------------------------------- node API client


def _client(cfg: CliConfig) -> httpx.Client:
    return httpx.Client(base_url=cfg.url, timeout=httpx.Timeout(30.0, connect=5.0))


def _request(cfg: CliConfig, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        with _client(cfg) as client:
            return client.request(method, path, **kwargs)
    except httpx.ConnectError:
        _fail(
            f"cannot reach the pyrsia node at {cfg.url}: is it running? Start it with "
            "'pyrsia node start', or point the CLI at it with 'pyrsia config -e'."
        )
    except httpx.HTTPError as exc:
        _fail(f"request to the pyrsia node at {cfg.url} failed: {exc}")


def _json_or_fail(resp: httpx.Response, what: str) -> Any:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code >= 400:
        message = data.get("error") if isinstance(data, dict) else None
        if not message:
            message = f"HTTP {resp.status_code} from {resp.request.url} (is it a pyrsia node?)"
        _fail(f"{what} failed: {message}")
    if data is None:
        _fail(f"{what} failed: {resp.request.url} did not answer with JSON (is it a pyrsia "
              "node?)")
    return data


# --------------------------------------------------------------------------- commands


def cmd_node_start(args: argparse.Namespace) -> int:
    import anyio

    from pyrsia_registry import NodeConfig, default_data_dir, parse_rate, parse_size, run_node

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)-5s %(name)s > %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic: one line per handshake
    try:
        config = NodeConfig(
            host=args.host,
            port=args.port,
            data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
            upstream=None if args.no_upstream else args.upstream,
            disk_space=parse_size(args.disk_space),
            kv_store=args.kv_store,
            peers=tuple(args.peer),
            listen_only=args.listen_only,
            no_serve=args.no_serve,
            max_upload_rate=parse_rate(args.max_upload_rate) if args.max_upload_rate else None,
            public_url=args.public_url,
            transport=args.transport,
            quic_port=args.quic_port,
            sync_interval=args.sync_interval,
            blob_store=args.blob_store,
            package_options=_package_options(args.package_option),
            transport_options=_package_options(args.transport_option, "--transport-option",
                                               "quic.max_datagram_size=8192"),
            allowed_hosts=tuple(args.allowed_host),
            upstream_options=_upstream_options(args.upstream_option),
        )
    except Exception as exc:
        _fail(f"invalid node configuration: {exc}", EXIT_USAGE)
    try:
        anyio.run(run_node, config)
    except BaseException as exc:  # task groups wrap errors in exception groups
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return 0
        if isinstance(leaf, OSError):
            hint = " (is another node running there? choose another port with -p)" if (
                leaf.errno == errno.EADDRINUSE) else ""
            _fail(f"cannot start the node on {config.host}:{config.port}: "
                  f"{leaf.strerror or leaf}{hint}")
        from pyrsia_core.errors import PyrsiaError

        if isinstance(leaf, PyrsiaError):
            _fail(f"cannot start the node: {leaf}")
        raise
    return 0


def _package_options(
    items: list[str], flag: str = "--package-option",
    example: str = "maven.upstream=https://repo1.maven.org/maven2",
) -> dict[str, dict[str, str]]:
    """``["maven.upstream=URL"]`` -> ``{"maven": {"upstream": "URL"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not name or not option:
            raise ValueError(f"{flag} {item!r}: expected NAME.KEY=VALUE, e.g. {example}")
        out.setdefault(name, {})[option] = value
    return out


def _upstream_options(items: list[str]) -> dict[str, str]:
    """``["min_rate=4096"]`` -> ``{"min_rate": "4096"}`` (``--upstream-option``)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--upstream-option {item!r}: expected KEY=VALUE, e.g. "
                             "min_rate=4096")
        out[key.strip()] = value.strip()
    return out


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while True:
        inner = getattr(exc, "exceptions", None)
        if not inner:
            return exc
        exc = inner[0]


def _prompt(label: str, default: str, validate: Any) -> Any:
    while True:
        try:
            answer = input(f"Enter {label}: [{default}]\n")
        except EOFError:
            answer = ""
        print()
        try:
            return validate(answer.strip() or default)
        except ConfigError as exc:
            print(f"Invalid value: {exc}")


def cmd_config(args: argparse.Namespace) -> int:
    path = config_path()
    cfg = CliConfig.load(path)
    if args.edit:
        cfg.host = _prompt("host", cfg.host, validate_host)
        cfg.port = _prompt("port", str(cfg.port), validate_port)
        cfg.disk_allocated = _prompt(
            "disk space to be allocated to pyrsia(Please enter with units ex: 10 GB)",
            cfg.disk_allocated,
            validate_disk_space,
        )
        cfg.save(path)
        print("Node configuration Saved !!")
        return 0
    changed = False
    if args.host is not None:
        cfg.host, changed = args.host, True
    if args.port is not None:
        cfg.port, changed = args.port, True
    if args.disk_space is not None:
        cfg.disk_allocated, changed = args.disk_space, True
    if changed:
        cfg.save(path)
        print("Node configuration Saved !!")
    if args.show or not changed:
        print(json.dumps({"host": cfg.host, "port": cfg.port,
                          "disk_allocated": cfg.disk_allocated}, indent=2))
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    cfg = CliConfig.load()
    resp = _request(cfg, "GET", "/api/ping")
    data = _json_or_fail(resp, "ping")
    print(f"Connection Successful !! node {data.get('node_id', '?')} at {cfg.url}")
    return 0


def _size(n: int) -> str:
    from pyrsia_registry import format_size

    return format_size(n)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = CliConfig.load()
    data = _json_or_fail(_request(cfg, "GET", "/api/status"), "status")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    quota = int(data["disk_allocated"])
    used = int(data["disk_usage"])
    pct = 100.0 * used / quota if quota else 0.0
    print(f"Node id:                    {data['node_id']}")
    print(f"Connected peers count:      {data['peers_count']}")
    print(f"Artifacts count:            {data['artifact_count']}")
    print(f"Total disk space allocated: {_size(quota)}")
    print(f"Disk space used:            {_size(used)} of {_size(quota)} ({pct:.4f}%)")
    print(f"Ledger height:              {data['ledger_height']} "
          f"({data['log_records']} log records)")
    print(f"Authorized build nodes:     {len(data['authorized_build_nodes'])}"
          f"{' (this node is one)' if data.get('is_build_node') else ''}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    cfg = CliConfig.load()
    peers = _json_or_fail(_request(cfg, "GET", "/api/peers"), "list peers")
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    if not peers:
        print("No peers connected.")
        return 0
    print(f"{'NODE ID':<66} {'ADDRESS':<30} LAST SEEN")
    for p in peers:
        print(f"{p.get('node_id', ''):<66} {p.get('address', ''):<30} {p.get('last_seen', '')}")
    return 0


def cmd_inspect_log(args: argparse.Namespace) -> int:
    option = ID_OPTIONS[args.package_type]
    if not getattr(args, option):
        args.parser.error(f"inspect-log {args.package_type} needs --{option}")
    cfg = CliConfig.load()
    params: dict[str, str] = {option: getattr(args, option), "format": args.format}
    if args.fields:
        params["fields"] = args.fields
    if args.latest:
        params["latest"] = "true"
    if args.proof:
        params["proof"] = "true"
    resp = _request(cfg, "GET", f"/api/inspect-log/{args.package_type}", params=params)
    if resp.status_code >= 400:
        _json_or_fail(resp, "inspect-log")
    sys.stdout.write(resp.text)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    cfg = CliConfig.load()
    if args.package_type == "status":
        if not args.id:
            _fail("pyrsia build status needs --id <build id>", EXIT_USAGE)
        data = _json_or_fail(_request(cfg, "GET", f"/api/builds/{args.id}"), "build status")
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            reason = f": {data['reason']}" if data.get("reason") else ""
            print(f"Build {data['build_id']} of {data['package_specific_id']}: "
                  f"{data['status']}{reason}")
        return 0 if data["status"] != "FAILED" else EXIT_ERROR
    option = ID_OPTIONS[args.package_type]
    if not getattr(args, option):
        example = "alpine:3.16.2" if option == "image" else "junit:junit:4.13.2"
        _fail(f"pyrsia build {args.package_type} needs --{option}, e.g. --{option} {example}",
              EXIT_USAGE)
    resp = _request(cfg, "POST", f"/api/build/{args.package_type}",
                    json={option: getattr(args, option)})
    data = _json_or_fail(resp, "Build request")
    print(f"Build request successfully handled. Build with ID {data['build_id']} has been "
          "requested.")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import anyio
    from pyrsia_core.errors import PyrsiaError

    from pyrsia_registry import default_data_dir, verify_offline

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    try:
        report = anyio.run(verify_offline, data_dir, args.image, args.package_type)
    except PyrsiaError as exc:
        _fail(f"verification FAILED: {exc}")
    except OSError as exc:
        _fail(f"verification FAILED: cannot read {data_dir}: {exc}")
    for artifact in report.records:
        print(f"verified  {artifact}")
    print(f"OK: {len(report.records)} record(s) of {report.package_id} are in the log "
          f"(ledger height {report.ledger_height}, {report.log_size} records, every block's "
          f"certificate checked against its build nodes); {report.blobs_checked} stored "
          f"artifact(s) hash correctly, {report.blobs_missing} not stored here")
    return 0


def cmd_authorize(args: argparse.Namespace) -> int:
    cfg = CliConfig.load()
    token = args.token
    if not token:
        from pyrsia_registry import default_data_dir

        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        try:
            token = (data_dir / "admin.token").read_text().strip()
        except OSError:
            _fail(f"no admin token: give --token, or --data-dir / PYRSIA_HOME of the node "
                  f"(looked for {data_dir / 'admin.token'})")
    resp = _request(cfg, "POST", "/api/authorize", json={"peer": args.peer},
                    headers={"Authorization": f"Bearer {token}"})
    if resp.status_code in (401, 403):
        _fail(f"the node refused: {resp.json().get('error', resp.text)} (status "
              f"{resp.status_code})")
    data = _json_or_fail(resp, "authorize")
    print(f"Node {data['authorized']} is now an authorized build node (ledger height "
          f"{data['ledger_height']}, {len(data['authorized_build_nodes'])} build nodes).")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``pyrsia cache list`` and ``pyrsia cache prune (--bytes N | --all | --older-than S)``."""
    cfg = CliConfig.load()
    if args.cache_command == "list":
        data = _json_or_fail(_request(cfg, "GET", "/api/cache"), "cache list")
        if args.json:
            print(json.dumps(data, indent=2))
            return 0
        blobs = data.get("blobs", [])
        if not blobs:
            print("The cache is empty.")
            return 0
        import time

        print(f"{'DIGEST':<71} {'SIZE':>10}  {'LAST USED':<19}  PACKAGES")
        for b in blobs:
            used = b.get("last_used")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(used)) if used else "-"
            print(f"{b['digest']:<71} {_size(int(b['size'])):>10}  {when:<19}  "
                  f"{', '.join(b.get('packages', [])) or '-'}")
        print(f"{data.get('count', len(blobs))} blob(s), {_size(int(data['disk_usage']))} of "
              f"{_size(int(data['disk_allocated']))}")
        return 0
    if args.bytes is not None:
        try:
            from pyrsia_registry import parse_size

            amount = int(args.bytes) if args.bytes.strip().isdigit() else parse_size(args.bytes)
        except Exception as exc:
            _fail(f"--bytes: {exc}", EXIT_USAGE)
        body: dict[str, Any] = {"bytes": amount}
    elif args.older_than is not None:
        if args.older_than < 0:
            _fail("--older-than must be a number of seconds >= 0", EXIT_USAGE)
        body = {"older_than": args.older_than}
    else:
        body = {"all": True}
    token = args.token
    if not token:
        from pyrsia_registry import default_data_dir

        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        try:
            token = (data_dir / "admin.token").read_text().strip()
        except OSError:
            _fail(f"no admin token: give --token, or --data-dir / PYRSIA_HOME of the node "
                  f"(looked for {data_dir / 'admin.token'})")
    resp = _request(cfg, "POST", "/api/cache/prune", json=body,
                    headers={"Authorization": f"Bearer {token}"})
    data = _json_or_fail(resp, "cache prune")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for r in data["removed"]:
        print(f"removed  {r['digest']}  {_size(int(r['size']))}")
    print(f"Pruned {len(data['removed'])} blob(s), {_size(int(data['removed_bytes']))}; "
          f"{_size(int(data['disk_usage']))} still used.")
    return 0


def _add_cache_parser(sub: Any) -> None:
    cache = sub.add_parser("cache", help="list or prune the node's cache of stored blobs")
    cache.set_defaults(help_parser=cache)
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    lst = cache_sub.add_parser("list", help="stored blobs, least recently used first")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_cache)
    prune = cache_sub.add_parser("prune", help="evict least recently used blobs (admin); the "
                                 "log keeps them, so they are fetched again when needed")
    what = prune.add_mutually_exclusive_group(required=True)
    what.add_argument("--bytes", metavar="SIZE", help="free at least SIZE (e.g. '500 MB')")
    what.add_argument("--all", action="store_true", help="evict every blob")
    what.add_argument("--older-than", type=int, metavar="SECONDS",
                      help="evict blobs unused for SECONDS")
    prune.add_argument("--token", help="the node's admin token (default: from its data dir)")
    prune.add_argument("--data-dir", help="the node's data directory (default $PYRSIA_HOME)")
    prune.add_argument("--json", action="store_true")
    prune.set_defaults(func=cmd_cache)


# --------------------------------------------------------------------------- parser


def _checked(validate: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a validator: bad values become usage errors (exit 2)."""

    def convert(text: str) -> Any:
        try:
            return validate(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = validate.__name__.removeprefix("validate_")
    return convert


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pyrsia",
        description="Pyrsia: a decentralized, verifiable package network. Run a node, configure "
        "the CLI, and inspect the transparency log.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"pyrsia {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    node = sub.add_parser("node", help="run a pyrsia node")
    node.set_defaults(help_parser=node)
    node_sub = node.add_subparsers(dest="node_command", metavar="ACTION")
    start = node_sub.add_parser("start", help="start a node (default 127.0.0.1:7888)")
    start.add_argument("-H", "--host", default=os.environ.get("PYRSIA_HOST", "127.0.0.1"),
                       help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    start.add_argument("-p", "--port", type=int, default=int(os.environ.get("PYRSIA_PORT", 7888)),
                       help="port to listen on (default 7888)")
    start.add_argument("--data-dir", help="data directory (default $PYRSIA_HOME or "
                       "~/.local/share/pyrsia)")
    start.add_argument("--upstream", default="https://registry-1.docker.io",
                       help="registry to build images from (default Docker Hub)")
    start.add_argument("--no-upstream", action="store_true", help="never contact an upstream")
    start.add_argument("--disk-space", default="10 GB",
                       help="disk space the node may use for artifacts (default '10 GB')")
    start.add_argument("--peer", action="append", default=[], metavar="URL",
                       help="a peer to join, e.g. http://127.0.0.1:44001 (repeatable)")
    start.add_argument("--listen-only", action="store_true",
                       help="do not dial out to peers; only answer those that connect")
    start.add_argument("--no-serve", action="store_true",
                       help="never serve artifacts to peers (still pulls from them)")
    start.add_argument("--max-upload-rate", metavar="RATE",
                       help="cap the bandwidth used to serve peers, e.g. 10MB/s")
    start.add_argument("--public-url", default="",
                       help="the address peers use to reach this node (default http://HOST:PORT)")
    start.add_argument("--transport", default="http",
                       help="peer transport plugin(s), comma-separated: http, quic or http,quic "
                       "(default http)")
    start.add_argument("--quic-port", type=int, default=None,
                       help="UDP port of the quic transport (default: the same number as --port)")
    start.add_argument("--sync-interval", type=float, default=5.0, help=argparse.SUPPRESS)
    start.add_argument("--kv-store", default="leveldb",
                       help="key-value store plugin for the ledger (default leveldb)")
    start.add_argument("--blob-store", default="fs",
                       help="blob store plugin for artifacts (default fs)")
    start.add_argument("--package-option", action="append", default=[],
                       metavar="TYPE.KEY=VALUE",
                       help="config of a package-type plugin, e.g. "
                       "maven.upstream=https://repo1.maven.org/maven2 (repeatable)")
    start.add_argument("--transport-option", action="append", default=[],
                       metavar="TRANSPORT.KEY=VALUE",
                       help="config of a transport plugin, e.g. quic.max_datagram_size=8192 "
                       "(repeatable)")
    start.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a further Host name (NAME or NAME:PORT) the node API answers "
                            "for, besides its own address and localhost (repeatable)")
    start.add_argument("--upstream-option", action="append", default=[], metavar="KEY=VALUE",
                       help="upstream setting (repeatable): min_rate (bytes/s), rate_window "
                            "(s), idle_timeout (s), timeout (s)")
    start.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    start.set_defaults(func=cmd_node_start)

    cfg = sub.add_parser("config", help="configure the CLI (node address, disk space)")
    cfg.add_argument("-e", "--edit", action="store_true", help="edit interactively")
    cfg.add_argument("-s", "--show", action="store_true", help="show the configuration")
    cfg.add_argument("--host", type=_checked(validate_host), help="the node's host name or IP")
    cfg.add_argument("--port", type=_checked(validate_port), help="the node's port (1-65535)")
    cfg.add_argument("--disk-space", type=_checked(validate_disk_space),
                     help="disk space to allocate, with units, e.g. '10 GB'")
    cfg.set_defaults(func=cmd_config)

    ping = sub.add_parser("ping", help="check that the node answers")
    ping.set_defaults(func=cmd_ping)

    status = sub.add_parser("status", help="node status: id, peers, artifacts, disk, ledger")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    lst = sub.add_parser("list", help="list the node's peers")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)

    inspect = sub.add_parser("inspect-log", help="show the transparency log of a package")
    inspect.add_argument("package_type", choices=PACKAGE_TYPES)
    inspect.add_argument("--image", help="docker: e.g. alpine:3.16.2")
    inspect.add_argument("--gav", help="maven: group:artifact:version, e.g. junit:junit:4.13.2")
    inspect.add_argument("--format", choices=["json", "csv"], default="json")
    inspect.add_argument("--fields", help="comma-separated record fields to show")
    inspect.add_argument("--latest", action="store_true", help="only the latest build's records")
    inspect.add_argument("--proof", action="store_true",
                         help="add Merkle inclusion proofs and the signed checkpoint")
    inspect.set_defaults(func=cmd_inspect_log, parser=inspect)

    verify = sub.add_parser("verify", help="verify a package offline from a node's data dir")
    verify.add_argument("package_type", choices=["docker"])
    verify.add_argument("--image", required=True, help="e.g. alpine:3.16.2")
    verify.add_argument("--data-dir", help="the node's data directory (default $PYRSIA_HOME)")
    verify.set_defaults(func=cmd_verify)

    auth = sub.add_parser("authorize", help="make a peer an authorized build node (admin)")
    auth.add_argument("--peer", required=True, help="the peer's node id")
    auth.add_argument("--token", help="the node's admin token (default: read from its data dir)")
    auth.add_argument("--data-dir", help="the node's data directory (default $PYRSIA_HOME)")
    auth.set_defaults(func=cmd_authorize)

    build = sub.add_parser("build", help="request a build, or follow one ('build status')")
    build.add_argument("package_type", choices=[*PACKAGE_TYPES, "status"])
    build.add_argument("--image", help="image to build, e.g. alpine:3.16.3")
    build.add_argument("--gav", help="Maven package to build, e.g. junit:junit:4.13.2")
    build.add_argument("--id", help="build id (for 'build status')")
    build.add_argument("--json", action="store_true")
    build.set_defaults(func=cmd_build)
    _add_cache_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):  # "pyrsia" or "pyrsia node" alone
        getattr(args, "help_parser", parser).print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
