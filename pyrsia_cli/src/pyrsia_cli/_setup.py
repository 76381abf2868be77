"""``pyrsia setup``: point a container client at the node, or install the node as a service.

Each target writes one configuration file (or merges into one, for Docker), keeps a backup of
what it replaces, says what it did, and changes nothing when run again with the same values.
``--undo`` takes back what setup added; ``--dry-run`` prints what would be written, and where.

* ``docker``: ``registry-mirrors`` in ``/etc/docker/daemon.json`` (merged; every other key kept).
* ``podman``: a ``registries.conf.d`` drop-in (``50-pyrsia.conf``) with the node as the mirror.
* ``containerd``: ``certs.d/<registry>/hosts.toml`` with the node as a pull/resolve host.
* ``service``: a systemd unit that runs ``pyrsia node start``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from ._config import CliConfig, ConfigError

__all__ = ["MIRRORED_REGISTRIES", "MirroredRegistry", "configure_parser"]

BACKUP_SUFFIX = ".pyrsia-backup"
HEADER = "# Written by 'pyrsia setup {target}'; 'pyrsia setup {target} --undo' removes it."


class SetupError(Exception):
    """A setup step that cannot be done (printed as ``Error: ...``, exit 1)."""


@attrs.frozen
class MirroredRegistry:
    """A registry the node mirrors, as each client names it."""

    #: The name images are pulled by (``docker.io/library/alpine``).
    name: str
    #: Where podman goes when the mirror fails (the registry's own ``location``).
    podman_location: str
    #: The registry's own server for containerd's ``hosts.toml``.
    containerd_server: str


#: The registries the node mirrors today (its upstream is Docker Hub). A new entry here is
#: configured by every target at once.
MIRRORED_REGISTRIES: tuple[MirroredRegistry, ...] = (
    MirroredRegistry("docker.io", "docker.io", "https://registry-1.docker.io"),
)


# --------------------------------------------------------------------------- file changes


@attrs.frozen
class Change:
    """The new content of one file (``None``: remove it), and what to tell the user."""

    path: Path
    content: str | None
    summary: str
    #: Restore this backup instead of writing ``content`` (undo).
    restore: Path | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None  # no such file (writing it then says why it cannot be created)
    except OSError as exc:
        raise SetupError(f"cannot read {path}: {exc.strerror or exc}") from None


def _apply(change: Change, *, dry_run: bool, backup: bool = True) -> bool:
    """Make ``change`` (keeping a backup of a replaced file); ``False`` if nothing changes."""
    path = change.path
    old = _read(path)
    if change.restore is None and old == change.content:
        return False
    if dry_run:
        if change.restore is not None:
            print(f"Would restore {path} from {change.restore}:")
            print(_read(change.restore) or "", end="")
        elif change.content is None:
            print(f"Would remove {path}")
        else:
            print(f"Would write {path}:")
            print(change.content, end="" if change.content.endswith("\n") else "\n")
        return True
    try:
        if change.restore is not None:
            os.replace(change.restore, path)
        elif change.content is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            saved = _backup_of(path)
            if backup and old is not None and not saved.exists():
                shutil.copy2(path, saved)
            tmp = path.with_name(path.name + ".pyrsia-tmp")
            tmp.write_text(change.content)
            if path.exists():
                shutil.copymode(path, tmp)
            os.replace(tmp, path)
    except OSError as exc:
        where = exc.filename or path
        hint = (" (run it as root, or write elsewhere with --file / --config-dir)"
                if isinstance(exc, PermissionError) else "")
        raise SetupError(f"cannot write {where}: {exc.strerror or exc}{hint}") from None
    return True


def _backup_of(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def _report(changes: list[tuple[Change, bool]], dry_run: bool, unchanged: str) -> None:
    if not any(done for _, done in changes):
        print(unchanged)
        return
    for change, done in changes:
        if done and not dry_run:
            print(change.summary)


# --------------------------------------------------------------------------- the node address


def _node(args: argparse.Namespace, target: Callable[[argparse.Namespace], CliConfig]) -> str:
    """``HOST:PORT`` of the node the client should pull through."""
    try:
        cfg = target(args)  # --node, else PYRSIA_NODE, else the CLI's configured node
        host, port = cfg.host, cfg.port
    except ConfigError as exc:
        raise SetupError(str(exc)) from None
    if host in ("0.0.0.0", "::"):  # a node listening everywhere is reached on loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


# --------------------------------------------------------------------------- docker


def docker_change(path: Path, mirror_url: str, *, undo: bool) -> Change:
    """Merge ``mirror_url`` into (or out of) ``registry-mirrors`` of ``daemon.json``."""
    old = _read(path)
    config: dict[str, Any] = {}
    if old is not None and old.strip():
        try:
            config = json.loads(old)
        except ValueError as exc:
            raise SetupError(f"{path} is not valid JSON ({exc}); fix or move it, then run "
                             "setup again (nothing was changed)") from None
        if not isinstance(config, dict):
            raise SetupError(f"{path} is not a JSON object; fix or move it, then run setup "
                             "again (nothing was changed)")
    mirrors = config.get("registry-mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise SetupError(f"{path}: 'registry-mirrors' is not a list of URLs; fix it, then run "
                         "setup again (nothing was changed)")
    ours = [m for m in mirrors if m.rstrip("/") == mirror_url]
    if undo:
        backup = _backup_of(path)
        saved = _read(backup)
        if saved is not None and old is not None and _merged_text(saved, mirror_url) == old:
            # The file is as setup left it: put the original back, byte for byte.
            return Change(path, old, f"Restored {path} from {backup}.", restore=backup)
        if not ours:
            return Change(path, old, "")
        config["registry-mirrors"] = [m for m in mirrors if m not in ours]
        if not config["registry-mirrors"]:
            del config["registry-mirrors"]
        if not config and saved is None:
            return Change(path, None, f"Removed {path} (setup had created it).")
        return Change(path, json.dumps(config, indent=2) + "\n",
                      f"Removed the mirror {mirror_url} from {path}.")
    if ours == mirrors[:1] and len(ours) == 1 and old is not None:
        return Change(path, old, "")  # already first: nothing to change
    config["registry-mirrors"] = [mirror_url, *(m for m in mirrors if m not in ours)]
    return Change(path, json.dumps(config, indent=2) + "\n",
                  f"Wrote {path}: docker pulls Docker Hub images through {mirror_url}.")


def _merged_text(original: str, mirror_url: str) -> str | None:
    """What setup writes over ``original`` (to tell whether a file is still as setup left it)."""
    scratch = _Scratch(original)
    try:
        return docker_change(scratch.path, mirror_url, undo=False).content
    except SetupError:
        return None
    finally:
        scratch.close()


class _Scratch:
    """A temporary file holding ``text`` (docker_change reads files)."""

    def __init__(self, text: str) -> None:
        import tempfile

        fd, name = tempfile.mkstemp(prefix="pyrsia-setup-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.path = Path(name)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def cmd_docker(args: argparse.Namespace, target: Any) -> int:
    node = _node(args, target)
    path = Path(args.file) if args.file else Path(args.config_dir or "/etc/docker") / "daemon.json"
    mirror_url = f"http://{node}"
    change = docker_change(path, mirror_url, undo=args.undo)
    done = _apply(change, dry_run=args.dry_run, backup=not args.undo)
    if args.undo:
        _report([(change, done)], args.dry_run, f"{path} has no mirror {mirror_url}: nothing to "
                "undo.")
    else:
        _report([(change, done)], args.dry_run,
                f"{path} already points docker at {mirror_url}: nothing to change.")
    if done and not args.dry_run:
        print("Apply it: sudo systemctl reload docker (or restart docker).")
    return 0


# --------------------------------------------------------------------------- podman


def podman_content(node: str, fallback: str | None) -> str:
    lines = [HEADER.format(target="podman")]
    for reg in MIRRORED_REGISTRIES:
        lines += [
            "",
            "[[registry]]",
            f"prefix = {_toml_string(reg.name)}",
            f"location = {_toml_string(fallback or reg.podman_location)}",
            "",
            "[[registry.mirror]]",
            f"location = {_toml_string(node)}",
            "insecure = true",
        ]
    return "\n".join(lines) + "\n"


def _podman_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/etc/containers")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "containers"


def cmd_podman(args: argparse.Namespace, target: Any) -> int:
    node = _node(args, target)
    if args.file:
        path = Path(args.file)
    else:
        base = Path(args.config_dir) if args.config_dir else _podman_dir()
        path = base / "registries.conf.d" / "50-pyrsia.conf"
    return _owned_file(args, path, podman_content(node, args.fallback), "podman",
                       f"podman pulls {', '.join(r.name for r in MIRRORED_REGISTRIES)} images "
                       f"through {node}")


def _owned_file(args: argparse.Namespace, path: Path, content: str, client: str,
                what: str) -> int:
    """Write (or, with ``--undo``, remove) a file setup owns; a replaced file is backed up."""
    old = _read(path)
    if args.undo:
        backup = _backup_of(path)
        if old is None:
            print(f"{path} does not exist: nothing to undo.")
            return 0
        if not old.startswith(HEADER.format(target=client)):
            raise SetupError(f"{path} was not written by 'pyrsia setup {client}': left as it "
                             "is")
        if backup.exists():
            change = Change(path, None, f"Restored {path} from {backup}.", restore=backup)
        else:
            change = Change(path, None, f"Removed {path}.")
        _apply(change, dry_run=args.dry_run)
        if not args.dry_run:
            print(change.summary)
        return 0
    change = Change(path, content, f"Wrote {path}: {what}.")
    # A file of someone else's is kept as the backup; an older one of ours is not worth it.
    mine = old is not None and old.startswith(HEADER.format(target=client))
    done = _apply(change, dry_run=args.dry_run, backup=not mine)
    _report([(change, done)], args.dry_run, f"{path} is already up to date: nothing to change.")
    return 0


# --------------------------------------------------------------------------- containerd


def containerd_content(reg: MirroredRegistry, node: str, fallback: str | None) -> str:
    server = fallback or reg.containerd_server
    if "://" not in server:
        server = f"https://{server}"
    return "\n".join([
        HEADER.format(target="containerd"),
        f"server = {_toml_string(server)}",
        "",
        f"[host.{_toml_string('http://' + node)}]",
        '  capabilities = ["pull", "resolve"]',
        "",
    ])


def cmd_containerd(args: argparse.Namespace, target: Any) -> int:
    node = _node(args, target)
    if args.file and len(MIRRORED_REGISTRIES) != 1:
        raise SetupError("--file names one file, but several registries are mirrored: use "
                         "--config-dir")
    code = 0
    for reg in MIRRORED_REGISTRIES:
        if args.file:
            path = Path(args.file)
        else:
            base = Path(args.config_dir or "/etc/containerd/certs.d")
            path = base / reg.name / "hosts.toml"
        code |= _owned_file(args, path, containerd_content(reg, node, args.fallback),
                            "containerd", f"containerd pulls {reg.name} images through {node}")
    if not args.undo and not args.file and not args.dry_run:
        base = Path(args.config_dir or "/etc/containerd/certs.d")
        print(f"containerd reads it when its CRI registry config_path is {base} (or use "
              f"'ctr images pull --hosts-dir {base}').")
    return code


# --------------------------------------------------------------------------- service


def _systemd_quote(word: str) -> str:
    if word and all(c.isalnum() or c in "/._-:=,@+" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pyrsia_command() -> list[str]:
    """The absolute command that runs this CLI (the installed script, else ``python -m``)."""
    # Not resolved: a virtualenv's python is a symlink whose target lacks the venv.
    python = Path(sys.executable).absolute()
    here = python.parent / "pyrsia"
    if here.is_file() and os.access(here, os.X_OK):
        return [str(here)]
    script = shutil.which("pyrsia")
    if script:
        return [str(Path(script).absolute())]
    return [str(python), "-m", "pyrsia_cli"]


def service_content(args: argparse.Namespace) -> str:
    data_dir = args.data_dir or ("/var/lib/pyrsia" if os.geteuid() == 0 else None)
    argv = [*_pyrsia_command(), "node", "start", "--host", args.host, "--port", str(args.port)]
    if data_dir:
        argv += ["--data-dir", str(Path(data_dir).absolute())]
    for peer in args.peer:
        argv += ["--peer", peer]
    if args.upstream:
        argv += ["--upstream", args.upstream]
    argv += list(args.node_arg)
    lines = [
        HEADER.format(target="service"),
        "[Unit]",
        "Description=Pyrsia node (verified Docker/OCI registry mirror)",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_quote(a) for a in argv),
        "Restart=on-failure",
        "RestartSec=5",
        # The node answers SIGTERM by letting in-flight pulls finish (at most 10 s), closing
        # its stores and exiting 0; systemd kills it only after TimeoutStopSec.
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={args.stop_timeout}",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if args.user:
        lines.append(f"User={args.user}")
    if data_dir and os.geteuid() == 0 and not args.data_dir:
        lines.append("StateDirectory=pyrsia")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def cmd_service(args: argparse.Namespace, target: Any) -> int:
    path = Path(args.file) if args.file else Path("/etc/systemd/system/pyrsia.service")
    unit = path.name
    code = _owned_file(args, path, service_content(args), "service",
                       f"systemd runs the node as {unit}")
    if args.dry_run:
        return code
    if args.undo:  # systemd still knows the unit until the reload: it can be stopped
        print(f"Then run: systemctl disable --now {unit} && systemctl daemon-reload")
        return code
    commands = ["systemctl daemon-reload", f"systemctl enable --now {unit}"]
    if not args.file and _systemd_running():
        result = subprocess.run(["systemctl", "daemon-reload"], check=False)
        if result.returncode != 0:
            raise SetupError("systemctl daemon-reload failed")
        commands = commands[1:]
    if commands:
        print("Then run: " + " && ".join(commands))
    return code


# --------------------------------------------------------------------------- parser


def configure_parser(parser: argparse.ArgumentParser,
                     target: Callable[[argparse.Namespace], CliConfig]) -> None:
    """The ``setup`` subcommands on ``parser``; ``target`` resolves the CLI's node."""
    parser.set_defaults(help_parser=parser)
    sub = parser.add_subparsers(dest="setup_target", metavar="TARGET")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true",
                        help="print what would be written (and where); change nothing")
    common.add_argument("--undo", action="store_true",
                        help="take back what setup added (restores the backup it kept)")
    common.add_argument("--file", metavar="PATH", help="the file to write (instead of the "
                        "client's usual one)")
    clients = argparse.ArgumentParser(add_help=False, parents=[common])
    clients.add_argument("--node", metavar="HOST:PORT",
                         help="the node to pull through (default: $PYRSIA_NODE, else the node "
                         "running from $PYRSIA_HOME, else 'pyrsia config')")
    clients.add_argument("--config-dir", metavar="DIR",
                         help="the client's configuration directory (instead of the usual one)")
    fallback = argparse.ArgumentParser(add_help=False)
    fallback.add_argument("--fallback", metavar="LOCATION",
                          help="where the client goes when the node fails (default: the "
                          "registry itself, docker.io / https://registry-1.docker.io)")

    def run(fn: Callable[[argparse.Namespace, Any], int]) -> Callable[[argparse.Namespace], int]:
        def command(args: argparse.Namespace) -> int:
            try:
                return fn(args, target)
            except SetupError as exc:
                print(f"Error: {exc}", file=sys.stderr)
                return 1
        return command

    docker = sub.add_parser("docker", parents=[clients],
                            help="add the node to registry-mirrors in /etc/docker/daemon.json")
    docker.set_defaults(func=run(cmd_docker))
    podman = sub.add_parser("podman", parents=[clients, fallback],
                            help="a registries.conf.d drop-in making the node podman's mirror")
    podman.set_defaults(func=run(cmd_podman))
    ctrd = sub.add_parser("containerd", parents=[clients, fallback],
                          help="certs.d/<registry>/hosts.toml (default dir "
                          "/etc/containerd/certs.d) making the node a pull host")
    ctrd.set_defaults(func=run(cmd_containerd))
    service = sub.add_parser("service", parents=[common],
                             help="a systemd unit running 'pyrsia node start' "
                             "(/etc/systemd/system/pyrsia.service)")
    service.add_argument("-H", "--host", default="127.0.0.1",
                         help="address the node listens on (default 127.0.0.1)")
    service.add_argument("-p", "--port", type=int, default=7888, help="port (default 7888)")
    service.add_argument("--data-dir", help="data directory (default /var/lib/pyrsia as root)")
    service.add_argument("--peer", action="append", default=[], metavar="URL",
                         help="a peer to join (repeatable)")
    service.add_argument("--upstream", help="registry to build images from")
    service.add_argument("--user", help="run the node as this user")
    service.add_argument("--stop-timeout", type=int, default=30, metavar="SECONDS",
                         help="TimeoutStopSec: how long systemd waits after SIGTERM (default "
                         "30)")
    service.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                         help="one more argument for 'pyrsia node start' (repeatable), e.g. "
                         "--node-arg=--listen-only")
    service.set_defaults(func=run(cmd_service))
