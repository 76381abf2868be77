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
    parse_node_address,
    validate_disk_space,
    validate_host,
    validate_port,
)

__all__ = ["format_ago", "main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
#: Package types the CLI knows, and the option naming a package of each.
#: The package-id option of a package type the node has but this machine does not.
GENERIC_ID = "id"


def installed_package_types() -> dict[str, tuple[str, str]]:
    """``name -> (id option, example)`` of the package-type plugins installed here
    (``docker -> ("image", "alpine:3.16.3")``): the CLI knows no package type by name."""
    from pyrsia_core.errors import PyrsiaError

    from pyrsia_core import plugins

    try:
        names = sorted(plugins.available("pyrsia.package_type"))
    except PyrsiaError:
        return {}
    out: dict[str, tuple[str, str]] = {}
    for name in names:
        try:
            pt = plugins.create("pyrsia.package_type", name, {})
            param, example = getattr(pt, "id_param", GENERIC_ID), getattr(pt, "id_example", "")
        except Exception:  # a broken plugin: still reachable with the generic option
            param, example = GENERIC_ID, ""
        if not isinstance(param, str) or not param.isidentifier():
            param = GENERIC_ID
        out[name] = (param, example if isinstance(example, str) else "")
    return out


def _id_option(package_type: str) -> str:
    return installed_package_types().get(package_type, (GENERIC_ID, ""))[0]


def _package_id(args: argparse.Namespace, command: str) -> tuple[str, str]:
    """``(option, value)`` of the package id the user gave for ``args.package_type``."""
    option = _id_option(args.package_type)
    value = getattr(args, option, None) or getattr(args, GENERIC_ID, None)
    if not value:
        args.parser.error(f"{command} {args.package_type} needs --{option}")
    return option, str(value)


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    raise CliError(message, code)


# --------------------------------------------------------------------------- node API client


def _client(cfg: CliConfig) -> httpx.Client:
    return httpx.Client(base_url=cfg.url, timeout=httpx.Timeout(30.0, connect=5.0),
                        trust_env=False)


def _explicit_data_dir(args: argparse.Namespace) -> Path | None:
    """The data dir the user named (``--data-dir`` or ``$PYRSIA_HOME``), if any."""
    named = getattr(args, "data_dir", None) or os.environ.get("PYRSIA_HOME")
    return Path(named) if named else None


def _data_dir(args: argparse.Namespace) -> Path:
    from pyrsia_registry import default_data_dir

    return _explicit_data_dir(args) or default_data_dir()


def _target(args: argparse.Namespace) -> CliConfig:
    """Which node a command talks to, in this order: ``--node``, ``$PYRSIA_NODE``, the
    node running from ``--data-dir`` / ``$PYRSIA_HOME`` (its ``node.url``), the CLI
    configuration (``pyrsia config``)."""
    path = config_path()
    cfg = CliConfig.load(path)
    cfg.source = f"the CLI configuration {path}" if path.exists() else "the default"
    given = getattr(args, "node", None)
    if given:
        cfg.host, cfg.port = parse_node_address(given)
        cfg.source = "--node"
        return cfg
    env = os.environ.get("PYRSIA_NODE")
    if env:
        try:
            cfg.host, cfg.port = parse_node_address(env)
        except ConfigError as exc:
            raise ConfigError(f"PYRSIA_NODE: {exc}") from None
        cfg.source = "PYRSIA_NODE"
        return cfg
    data_dir = _explicit_data_dir(args)
    if data_dir is not None:
        url_file = data_dir / "node.url"
        try:
            cfg.host, cfg.port = parse_node_address(url_file.read_text().strip())
            cfg.source = f"the node running from {data_dir}"
        except OSError:
            pass  # no node runs from that data dir: the configured node
        except ConfigError as exc:
            raise ConfigError(f"{url_file}: {exc}") from None
    return cfg


def _request(cfg: CliConfig, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        with _client(cfg) as client:
            return client.request(method, path, **kwargs)
    except httpx.ConnectError:
        _fail(
            f"cannot reach the pyrsia node at {cfg.url} (from {cfg.source}): is it running? "
            "Start it with 'pyrsia node start', or name it with --node HOST:PORT, "
            "PYRSIA_NODE or 'pyrsia config -e'."
        )
    except httpx.HTTPError as exc:
        _fail(f"request to the pyrsia node at {cfg.url} failed: {exc}")


def _admin_token(args: argparse.Namespace) -> str:
    """``--token``, else the admin token in the node's data dir."""
    if getattr(args, "token", None):
        return str(args.token)
    data_dir = _data_dir(args)
    try:
        token = (data_dir / "admin.token").read_text().strip()
    except OSError:
        token = ""
    if not token:
        _fail(f"no admin token: give --token, or --data-dir / PYRSIA_HOME of the node "
              f"(looked for {data_dir / 'admin.token'})")
    return token


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

    from ._logging import configure_logging

    configure_logging(args.log_level, getattr(args, "log_format", "text"),
                      getattr(args, "log_file", None))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic: one line per handshake
    try:
        upstream_options = _upstream_options(args.upstream_option)
        hub, package_options = _upstreams(args.upstream, args.upstream_credentials,
                                          _package_options(args.package_option),
                                          upstream_options)
        config = NodeConfig(
            host=args.host,
            port=args.port,
            data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
            upstream=None if args.no_upstream else hub,
            disk_space=parse_size(args.disk_space) if args.disk_space else None,
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
            package_options=package_options,
            transport_options=_package_options(args.transport_option, "--transport-option",
                                               "quic.max_datagram_size=8192"),
            consensus_timeout=args.consensus_timeout,
            allowed_hosts=tuple(args.allowed_host),
            upstream_options=upstream_options,
            witness_key=args.witness_key,
            witnesses=_witness_targets(args.witness),
            witness_policy=_witness_policy(args),
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
            if leaf.filename:
                _fail(f"cannot start the node: {leaf.filename}: {leaf.strerror or leaf}")
            hint = " (is another node running there? choose another port with -p)" if (
                leaf.errno == errno.EADDRINUSE) else ""
            _fail(f"cannot start the node on {config.host}:{config.port}: "
                  f"{leaf.strerror or leaf}{hint}")
        from pyrsia_core.errors import PyrsiaError

        if isinstance(leaf, PyrsiaError):
            _fail(f"cannot start the node: {leaf}")
        raise
    return 0


def _id_arguments(parser: argparse.ArgumentParser,
                  types: dict[str, tuple[str, str]]) -> None:
    """``--image``, ``--gav``...: the id option of each installed package type, and ``--id``
    for any other type the node may have."""
    by_option: dict[str, list[str]] = {}
    for name, (option, example) in types.items():
        by_option.setdefault(option, []).append(f"{name}: e.g. {example}" if example else name)
    by_option.setdefault(GENERIC_ID, [])
    for option, uses in by_option.items():
        parser.add_argument(f"--{option}", help="; ".join(uses) if uses else
                            "the package id (any package type)")


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


def _upstreams(
    items: list[str], credentials: list[str], package_options: dict[str, dict[str, str]],
    upstream_options: dict[str, str] | None = None,
) -> tuple[str, dict[str, dict[str, str]]]:
    """``--upstream URL`` (Docker Hub's) and ``--upstream REGISTRY=URL`` (repeatable) ->
    (Docker Hub's URL, package options with ``docker.registries`` / ``docker.credentials``).
    """
    hub = os.environ.get("PYRSIA_UPSTREAM", DEFAULT_UPSTREAM_URL)
    others: list[str] = []
    for item in items:
        host, sep, url = item.partition("=")
        if sep and "/" not in host and url.startswith(("http://", "https://")):
            if host.strip().lower() in ("docker.io", "index.docker.io", "registry-1.docker.io"):
                hub = url
            else:
                others.append(f"{host.strip()}={url}")
        elif not sep and "://" not in item:
            others.append(item.strip())  # a well-known registry (ghcr.io): its own URL
        else:
            hub = item
    docker = package_options.setdefault("docker", {}) if others or credentials else None
    if docker is not None:
        if others:
            docker["registries"] = ",".join(filter(None, [docker.get("registries", ""),
                                                          *others]))
        for item in credentials:
            if "=" not in item:
                raise ValueError(f"--upstream-credentials {item!r}: expected REGISTRY=FILE, "
                                 "e.g. ghcr.io=/etc/pyrsia/ghcr.credentials")
        if credentials:
            docker["credentials"] = ",".join(filter(None, [docker.get("credentials", ""),
                                                           *credentials]))
        if upstream_options and others:  # the other registries' upstreams take them too
            docker.setdefault("upstream_options", ",".join(
                f"{k}={v}" for k, v in upstream_options.items()))
    return hub, package_options


DEFAULT_UPSTREAM_URL = "https://registry-1.docker.io"


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


def _witness_targets(items: list[str]) -> tuple[Any, ...]:
    """``--witness URL,KEY`` (repeatable): the witnesses a build node asks to cosign."""
    from pyrsia_registry import parse_witness_target

    return tuple(parse_witness_target(item) for item in items)


def _witness_policy(args: argparse.Namespace) -> Any:
    """``--witness-policy KEY ... --witness-threshold K`` as a WitnessPolicy (or None)."""
    from pyrsia_core import Cosigner, WitnessPolicy

    if not args.witness_policy:
        if args.witness_threshold is not None:
            raise ValueError("--witness-threshold needs --witness-policy")
        return None
    cosigners = []
    for item in args.witness_policy:
        try:
            cosigners.append(Cosigner.parse(item))
        except ValueError as exc:
            raise ValueError(f"--witness-policy {item!r:.200}: {exc}") from None
    threshold = len(cosigners) if args.witness_threshold is None else args.witness_threshold
    return WitnessPolicy(cosigners, threshold)


def _add_witness_policy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--witness-policy", action="append", default=[], metavar="KEY",
                        help="trust a checkpoint only with this witness's cosignature "
                        "(KEY: its vkey NAME+ID+BASE64 as 'pyrsia status' shows it, or "
                        "NAME=HEXKEY); repeatable")
    parser.add_argument("--witness-threshold", type=int, default=None, metavar="K",
                        help="how many of the --witness-policy witnesses must cosign "
                        "(default: all)")


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
    try:
        cfg = CliConfig.load(path)
    except ConfigError as exc:
        if not args.edit:
            raise ConfigError(f"{exc} (repair it with 'pyrsia config -e', or delete it)") from None
        print(f"Warning: {exc}; starting from the defaults.", file=sys.stderr)
        cfg = CliConfig()
    disk_changed = False
    if args.edit:
        cfg.host = _prompt("host", cfg.host, validate_host)
        cfg.port = _prompt("port", str(cfg.port), validate_port)
        disk = _prompt(
            "disk space to be allocated to pyrsia(Please enter with units ex: 10 GB)",
            cfg.disk_allocated,
            validate_disk_space,
        )
        cfg.disk_allocated = disk
        cfg.save(path)
        print("Node configuration Saved !!")
        _apply_disk_space(args, cfg)
        return 0
    changed = False
    if args.host is not None:
        cfg.host, changed = args.host, True
    if args.port is not None:
        cfg.port, changed = args.port, True
    if args.disk_space is not None:
        cfg.disk_allocated, changed, disk_changed = args.disk_space, True, True
    if changed:
        cfg.save(path)
        print("Node configuration Saved !!")
        if disk_changed:
            _apply_disk_space(args, cfg)
    if args.show or not changed:
        print(json.dumps({"host": cfg.host, "port": cfg.port,
                          "disk_allocated": cfg.disk_allocated}, indent=2))
    return 0


def _apply_disk_space(args: argparse.Namespace, cfg: CliConfig) -> None:
    """Give the node the disk space just configured: through its API while it runs (it
    evicts to fit at once), else in its data dir's settings for its next start."""
    from pyrsia_registry import parse_size, save_settings

    size = parse_size(cfg.disk_allocated)
    cfg.source = "the CLI configuration"
    target = _target(args)
    token = ""
    try:
        token = _admin_token(args)
    except CliError:
        pass
    try:
        with _client(target) as client:
            resp = client.put("/api/config", json={"disk_space": size},
                              headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError:
        resp = None
    if resp is not None and resp.status_code == 200:
        data = resp.json()
        evicted = int(data.get("evicted_bytes", 0))
        print(f"The node at {target.url} now uses at most {_size(size)} of disk"
              + (f" ({_size(evicted)} of cached artifacts evicted to fit)." if evicted else "."),
              file=sys.stderr)
        return
    if resp is not None:
        message = _error_of(resp)
        _fail(f"the node at {target.url} did not take the disk space: {message}"
              + (" (give --token or --data-dir / PYRSIA_HOME of the node)"
                 if resp.status_code == 401 else ""))
    data_dir = _data_dir(args)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        save_settings(data_dir, disk_space=size)
    except OSError as exc:
        _fail(f"the node at {target.url} is not running, and its settings in {data_dir} "
              f"cannot be written: {exc.strerror or exc}")
    print(f"The node at {target.url} is not running: it will use {_size(size)} of disk when "
          f"it starts from {data_dir}.", file=sys.stderr)


def _error_of(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        data = None
    message = data.get("error") if isinstance(data, dict) else None
    return str(message) if message else f"HTTP {resp.status_code}"


def cmd_ping(args: argparse.Namespace) -> int:
    import time

    cfg = _target(args)
    deadline = time.monotonic() + (args.wait or 0)
    while True:
        try:
            with _client(cfg) as client:
                resp = client.get("/api/ping")
            break
        except httpx.HTTPError:
            if time.monotonic() >= deadline:
                resp = _request(cfg, "GET", "/api/ping")  # fails with the usual message
                break
            time.sleep(0.2)
    data = _json_or_fail(resp, "ping")
    print(f"Connection Successful !! node {data.get('node_id', '?')} at {cfg.url}")
    return 0


def _size(n: int) -> str:
    from pyrsia_registry import format_size

    return format_size(n)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _target(args)
    data = _json_or_fail(_request(cfg, "GET", "/api/status"), "status")
    if args.field:
        if args.field not in data:
            _fail(f"the status has no field {args.field!r} (fields: {', '.join(sorted(data))})",
                  EXIT_USAGE)
        value = data[args.field]
        print(value if isinstance(value, str) else json.dumps(value))
        return 0
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
    if data.get("upstream"):
        print(f"Upstream:                   {data['upstream']}")
    witness = data.get("witness")
    if witness:
        print(f"Witness key (vkey):         {witness['vkey']}")
    policy = data.get("witness_policy")
    if policy:
        print(f"Witness policy:             {policy['threshold']} of "
              f"{len(policy['witnesses'])} witnesses (trusted up to block "
              f"{policy['trusted_height']})")
    for ev in data.get("split_views") or []:
        print(f"WARNING: SPLIT VIEW of {ev['origin']}: {ev['reason']}")
    stall = data.get("consensus_stall")
    if stall:
        print(f"WARNING: consensus stalled: {stall['reason']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    cfg = _target(args)
    peers = _json_or_fail(_request(cfg, "GET", "/api/peers"), "list peers")
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    if not peers:
        print("No peers connected.")
        return 0
    from ._terminal import format_table

    print(format_table(["NODE ID", "ADDRESS", "BUILD NODE", "LAST SEEN"], [
        [str(p.get("node_id", "")), str(p.get("address", "")),
         "yes" if p.get("is_build_node") else "no", format_ago(p.get("last_seen"))]
        for p in peers]))
    return 0


def format_ago(epoch: Any, now: float | None = None) -> str:
    """``1733335200`` -> ``"12 s ago"`` (``"never"`` for none)."""
    import time

    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or epoch <= 0:
        return "never"
    ago = max(0.0, (time.time() if now is None else now) - epoch)
    if ago < 90:
        return f"{ago:.0f} s ago"
    if ago < 90 * 60:
        return f"{ago / 60:.0f} min ago"
    if ago < 36 * 3600:
        return f"{ago / 3600:.0f} h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def cmd_inspect_log(args: argparse.Namespace) -> int:
    option, value = _package_id(args, "inspect-log")
    cfg = _target(args)
    params: dict[str, str] = {option: value, "format": args.format}
    if args.fields:
        params["fields"] = args.fields
    if args.latest:
        params["latest"] = "true"
    if args.proof:
        params["proof"] = "true"
    if args.artifact_types:
        params["artifact_types"] = "true"
    resp = _request(cfg, "GET", f"/api/inspect-log/{args.package_type}", params=params)
    if resp.status_code >= 400:
        _json_or_fail(resp, "inspect-log")
    sys.stdout.write(resp.text)
    return 0


def cmd_build_status(args: argparse.Namespace) -> int:
    cfg = _target(args)
    data = _json_or_fail(_request(cfg, "GET", f"/api/builds/{args.id}"), "build status")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        reason = f": {data['reason']}" if data.get("reason") else ""
        print(f"Build {data['build_id']} of {data['package_specific_id']}: "
              f"{data['status']}{reason}")
    return 0 if data["status"] != "FAILED" else EXIT_ERROR


def cmd_build(args: argparse.Namespace) -> int:
    cfg = _target(args)
    option, value = _package_id(args, "build")
    resp = _request(cfg, "POST", f"/api/build/{args.package_type}",
                    json={option if option != GENERIC_ID else "package_id": value})
    data = _json_or_fail(resp, "Build request")
    if args.json and not args.wait:
        print(json.dumps(data, indent=2))
        return 0
    if not args.json:
        print(f"Build request successfully handled. Build with ID {data['build_id']} has been "
              "requested.")
    if not args.wait:
        return 0
    return _wait_build(cfg, args, str(data["build_id"]))


def _wait_build(cfg: CliConfig, args: argparse.Namespace, build_id: str) -> int:
    """Follow a build until it is committed or fails (``--wait``), printing each change."""
    import time

    deadline = time.monotonic() + args.wait
    shown = ""
    while True:
        data = _json_or_fail(_request(cfg, "GET", f"/api/builds/{build_id}"), "build status")
        state = str(data["status"])
        line = state + (f": {data['reason']}" if data.get("reason") else "")
        if line != shown and not args.json:
            print(f"Build {build_id} of {data['package_specific_id']}: {line}", flush=True)
            shown = line
        if state in ("SUCCESS", "FAILED"):
            if args.json:
                print(json.dumps(data, indent=2))
            return 0 if state == "SUCCESS" else EXIT_ERROR
        if time.monotonic() >= deadline:
            _fail(f"build {build_id} is still {state} after {args.wait:g} s")
        time.sleep(0.3)


def cmd_verify(args: argparse.Namespace) -> int:
    import anyio
    from pyrsia_core.errors import PyrsiaError

    from pyrsia_registry import verify_offline

    from ._terminal import ProgressLine

    data_dir = _data_dir(args)
    progress = ProgressLine("verifying")  # on stderr, if it is a terminal
    try:
        policy = _witness_policy(args)
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)
    witnessed = None
    try:
        _, value = _package_id(args, "verify")
        progress.label = f"verifying {value}"
        report = anyio.run(verify_offline, data_dir, value, args.package_type, progress)
        if policy is not None:
            from pyrsia_registry import verify_witnessed

            witnessed = anyio.run(verify_witnessed, data_dir, args.package_type, value, policy)
    except PyrsiaError as exc:
        _fail(f"verification FAILED: {exc}")
    except OSError as exc:
        _fail(f"verification FAILED: cannot read {data_dir}: {exc}")
    finally:
        progress.close()
    for artifact in report.records:
        print(f"verified  {artifact}")
    print(f"OK: {len(report.records)} record(s) of {report.package_id} are in the log "
          f"(ledger height {report.ledger_height}, {report.log_size} records, every block's "
          f"certificate checked against its build nodes); {report.blobs_checked} stored "
          f"artifact(s) hash correctly, {report.blobs_missing} not stored here")
    if witnessed is not None:
        print(f"Witnessed: the checkpoint of block {witnessed[0]} covers them, cosigned by "
              f"{len(witnessed[1])} of the policy's witnesses ({', '.join(sorted(witnessed[1]))};"
              f" {policy.threshold} required)")
    return 0


def cmd_authorize(args: argparse.Namespace) -> int:
    add = args.command == "authorize"
    cfg = _target(args)
    token = _admin_token(args)
    resp = _request(cfg, "POST", f"/api/{args.command}",
                    json={"peer": args.peer, "force": bool(args.force)},
                    headers={"Authorization": f"Bearer {token}"})
    if resp.status_code in (401, 403):
        _fail(f"the node refused: {_error_of(resp)} (status {resp.status_code})")
    data = _json_or_fail(resp, args.command)
    count = len(data["authorized_build_nodes"])
    if add:
        print(f"Node {data['authorized']} is now an authorized build node (ledger height "
              f"{data['ledger_height']}, {count} build nodes).")
    else:
        print(f"Node {data['deauthorized']} is no longer a build node (ledger height "
              f"{data['ledger_height']}, {count} build node{'s' if count != 1 else ''}).")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``pyrsia cache list`` and ``pyrsia cache prune (--bytes N | --all | --older-than S)``."""
    cfg = _target(args)
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
    token = _admin_token(args)
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


def _add_cache_parser(sub: Any, client: argparse.ArgumentParser,
                      admin: argparse.ArgumentParser) -> None:
    cache = sub.add_parser("cache", help="list or prune the node's cache of stored blobs")
    cache.set_defaults(help_parser=cache)
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    lst = cache_sub.add_parser("list", parents=[client],
                               help="stored blobs, least recently used first")
    lst.add_argument("--json", action="store_true", help="print the node's JSON answer")
    lst.add_argument("--data-dir", help=argparse.SUPPRESS)
    lst.set_defaults(func=cmd_cache)
    prune = cache_sub.add_parser("prune", parents=[admin],
                                 help="evict least recently used blobs (admin); the "
                                 "log keeps them, so they are fetched again when needed")
    what = prune.add_mutually_exclusive_group(required=True)
    what.add_argument("--bytes", metavar="SIZE", help="free at least SIZE (e.g. '500 MB')")
    what.add_argument("--all", action="store_true", help="evict every blob")
    what.add_argument("--older-than", type=int, metavar="SECONDS",
                      help="evict blobs unused for SECONDS")
    prune.add_argument("--json", action="store_true", help="print the node's JSON answer")
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
    parser = argparse.ArgumentParser(
        prog="pyrsia",
        description="Pyrsia: a decentralized, verifiable package network. Run a node, configure "
        "the CLI, and inspect the transparency log.",
    )
    from ._version import VersionAction

    parser.add_argument("-V", "--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # Every command that talks to a node takes --node (else PYRSIA_NODE, PYRSIA_HOME's node,
    # the CLI configuration).
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--node", metavar="HOST:PORT",
                        help="the node to talk to, e.g. 127.0.0.1:7889 or http://host:port "
                        "(default: $PYRSIA_NODE, else the node running from $PYRSIA_HOME, else "
                        "'pyrsia config')")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the node's JSON answer")
    admin = argparse.ArgumentParser(add_help=False, parents=[client])
    admin.add_argument("--token", help="the node's admin token (default: read from its data dir)")
    admin.add_argument("--data-dir", help="the node's data directory (default $PYRSIA_HOME); "
                       "its admin token is used, and the node running from it is the target")

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
    start.add_argument("--upstream", action="append", default=[], metavar="[REGISTRY=]URL",
                       help="registry to build images from: a URL is Docker Hub's (default "
                       "$PYRSIA_UPSTREAM, else https://registry-1.docker.io); REGISTRY=URL "
                       "mirrors another registry too, e.g. ghcr.io=https://ghcr.io; a bare "
                       "gcr.io, ghcr.io, quay.io or registry.k8s.io uses its public URL "
                       "(repeatable)")
    start.add_argument("--upstream-credentials", action="append", default=[],
                       metavar="REGISTRY=FILE",
                       help="a file holding user:password for that registry (repeatable; "
                       "never logged)")
    start.add_argument("--no-upstream", action="store_true", help="never contact an upstream")
    start.add_argument("--disk-space", default=None,
                       help="disk space the node may use for artifacts, e.g. '10 GB' (default: "
                       "the node's setting from 'pyrsia config', else 10 GB); saved for later "
                       "starts")
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
    start.add_argument("--consensus-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="how long a build waits for the build nodes' quorum before it "
                       "fails (default 120)")
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
    start.add_argument("--witness-key", action="store_true",
                       help="act as a witness for the network (C2SP tlog-witness at "
                       "/witness/add-checkpoint), with a key of its own in the data dir")
    start.add_argument("--witness", action="append", default=[], metavar="URL,KEY",
                       help="a witness this build node asks to cosign each block: its URL "
                       "and its key (vkey) as its 'pyrsia status' shows it (repeatable)")
    _add_witness_policy(start)
    start.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"],
                       help="how much the node logs to stderr (default info)")
    from ._logging import add_log_options

    add_log_options(start)
    start.set_defaults(func=cmd_node_start)

    cfg = sub.add_parser("config", parents=[client],
                         help="configure the CLI and the node (address, disk space)")
    cfg.add_argument("-e", "--edit", action="store_true",
                     help="edit interactively (the disk space is given to the node)")
    cfg.add_argument("-s", "--show", action="store_true", help="show the configuration")
    cfg.add_argument("--host", type=_checked(validate_host), help="the node's host name or IP")
    cfg.add_argument("--port", type=_checked(validate_port), help="the node's port (1-65535)")
    cfg.add_argument("--disk-space", type=_checked(validate_disk_space),
                     help="disk space the node may use, with units, e.g. '10 GB'")
    cfg.add_argument("--token", help="the node's admin token (to change its disk space)")
    cfg.add_argument("--data-dir", help="the node's data directory (default $PYRSIA_HOME)")
    cfg.set_defaults(func=cmd_config)

    ping = sub.add_parser("ping", parents=[client], help="check that the node answers")
    ping.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                      help="keep trying for up to SECONDS (e.g. right after starting a node)")
    ping.set_defaults(func=cmd_ping)

    status = sub.add_parser("status", parents=[client, as_json],
                            help="node status: id, peers, artifacts, disk, ledger")
    status.add_argument("--data-dir", help=argparse.SUPPRESS)
    status.add_argument("--field", metavar="NAME",
                        help="print one field of the status, e.g. node_id (for scripts)")
    status.set_defaults(func=cmd_status)

    lst = sub.add_parser("list", parents=[client, as_json], help="list the node's peers")
    lst.add_argument("--data-dir", help=argparse.SUPPRESS)
    lst.set_defaults(func=cmd_list)

    inspect = sub.add_parser("inspect-log", parents=[client],
                             help="show the transparency log of a package")
    types = installed_package_types()
    inspect.add_argument("package_type", metavar="TYPE",
                         help=f"the package type ({', '.join(types) or 'none installed here'})"
                         ).suggestions = types  # type: ignore[attr-defined]
    _id_arguments(inspect, types)
    inspect.add_argument("--format", choices=["json", "csv"], default="json",
                         help="output format (default json)")
    inspect.add_argument("--fields", help="comma-separated record fields to show")
    inspect.add_argument("--latest", action="store_true", help="only the latest build's records")
    inspect.add_argument("--proof", action="store_true",
                         help="add Merkle inclusion proofs and the signed checkpoint")
    inspect.add_argument("--artifact-types", action="store_true",
                         help="add each artifact's type where the package type knows it "
                         "(e.g. a Docker image's signatures and SBOMs)")
    inspect.set_defaults(func=cmd_inspect_log, parser=inspect)

    verify = sub.add_parser("verify", help="verify a package offline from a node's data dir")
    verify.add_argument("package_type", metavar="TYPE",
                        help=f"the package type ({', '.join(types) or 'none installed here'})"
                        ).suggestions = types  # type: ignore[attr-defined]
    _id_arguments(verify, types)
    verify.set_defaults(parser=verify)
    verify.add_argument("--data-dir", help="the node's data directory (default $PYRSIA_HOME)")
    _add_witness_policy(verify)
    verify.set_defaults(func=cmd_verify)

    for name, helptext in (("authorize", "make a peer an authorized build node (admin)"),
                           ("deauthorize", "remove a build node from the build nodes (admin)")):
        auth = sub.add_parser(name, parents=[admin], help=helptext)
        auth.add_argument("--peer", required=True, help="the node id (64 hex characters)")
        auth.add_argument("--force", action="store_true",
                          help="even if the build nodes that answer now could then not reach "
                          "a quorum without it")
        auth.set_defaults(func=cmd_authorize)

    build = sub.add_parser("build", help="request a build, or follow one ('build status')")
    build.set_defaults(help_parser=build)
    build_sub = build.add_subparsers(dest="package_type", metavar="TYPE")
    for package_type, (option, example) in types.items():
        if package_type == "status":
            continue
        eg = f", e.g. --{option} {example}" if example else f" (--{option})"
        one = build_sub.add_parser(package_type, parents=[client, as_json],
                                   help=f"build a {package_type} package{eg}")
        one.add_argument(f"--{option}", required=True,
                         help=f"the package to build{', e.g. ' + example if example else ''}")
        one.set_defaults(parser=one)
        one.add_argument("--wait", type=float, nargs="?", const=300.0, default=0.0,
                         metavar="SECONDS",
                         help="follow the build until it is committed or fails (at most "
                         "SECONDS, default 300)")
        one.set_defaults(func=cmd_build)
    bstatus = build_sub.add_parser("status", parents=[client, as_json],
                                   help="the status of a build, by its id")
    bstatus.add_argument("--id", required=True, help="the build id 'pyrsia build' printed")
    bstatus.set_defaults(func=cmd_build_status)
    _add_cache_parser(sub, client, admin)

    from ._setup import configure_parser as setup_commands

    setup_commands(sub.add_parser("setup", help="point docker, podman or containerd at the "
                                  "node, or run it as a systemd service"), _target)
    from ._completion import configure_parser as completion_command

    completion_command(sub.add_parser("completion", help="print a shell completion script "
                                      "(bash or zsh)"), build_parser)
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
    except BrokenPipeError:
        # The reader went away (``pyrsia status | head -3``): no traceback, and nothing more
        # is written to the closed pipe when Python flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
