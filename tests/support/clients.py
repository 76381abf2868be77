"""Real OCI clients for tests: ``skopeo`` and ``podman``, isolated and kept off the internet.

Both helpers run the tool with a timeout, capture its output, and raise :class:`ToolError`
(carrying the command, exit code, stdout and stderr) when it fails.

podman and the "no outside traffic" rule
----------------------------------------
A ``registries.conf`` mirror is only a *first try*: when every mirror fails, containers/image
falls back to the registry's own ``location``. For ``prefix = "docker.io"`` that is Docker Hub,
which tests must never reach. ``blocked = true`` does not help: with podman 4.3.1 a blocked
entry still pulls from its mirrors *and* still falls back to its ``location`` when they fail
(both checked). So :func:`write_registries_conf` sets the primary ``location`` of the
``docker.io`` entry to ``127.0.0.1:1``: the fallback goes to a closed local port and fails with
"connection refused" instead of leaving the machine. podman 4.3.1 retries a failed pull three
times, one second apart, so a pull that must fail takes about 3 s. Every podman call also gets its
own ``CONTAINERS_REGISTRIES_CONF`` (a file with no registries when none is given, and short-name
resolution off), ``CONTAINERS_CONF``, auth file and ``HOME`` inside the test's temp dir, and no
proxy variables.

Use fully qualified names (``docker.io/library/alpine:3.16.2``), never short names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .net import LOCALHOST

__all__ = [
    "CLOSED_LOCAL_LOCATION",
    "ToolError",
    "podman",
    "podman_cleanup",
    "podman_env",
    "podman_runroot",
    "run_tool",
    "skopeo",
    "write_registries_conf",
]

CLOSED_LOCAL_LOCATION = f"{LOCALHOST}:1"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class ToolError(RuntimeError):
    """A client tool exited non-zero (or timed out)."""

    def __init__(
        self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = "timed out" if returncode is None else f"exited with {returncode}"
        super().__init__(f"{' '.join(self.argv)} {what}\nstderr:\n{stderr}\nstdout:\n{stdout}")


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in _PROXY_VARS and not k.startswith(("CONTAINERS_", "REGISTRY_AUTH"))
    }
    env.update(extra or {})
    return env


def run_tool(
    argv: Sequence[str],
    *,
    timeout: float = 120.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``, capture text output; raise :class:`ToolError` on failure if ``check``."""
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else _clean_env(),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:

        def text(v: str | bytes | None) -> str:
            return v.decode(errors="replace") if isinstance(v, bytes) else (v or "")

        raise ToolError(argv, None, text(exc.stdout), text(exc.stderr)) from exc
    if check and proc.returncode != 0:
        raise ToolError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def skopeo(
    *args: str,
    timeout: float = 120.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``skopeo <args>`` (e.g. ``skopeo("inspect", "--tls-verify=false", "docker://...")``).

    Runs with the proxy variables removed; pass ``--tls-verify=false`` (or
    ``--src-/--dest-tls-verify=false``) yourself for the plain-HTTP local registries.
    """
    return run_tool(["skopeo", *args], timeout=timeout, check=check, env=_clean_env(env))


def write_registries_conf(
    path: Path | str,
    mirrors: Sequence[str],
    *,
    prefix: str = "docker.io",
    fallback_location: str = CLOSED_LOCAL_LOCATION,
) -> Path:
    """Write a ``registries.conf`` that sends ``prefix`` to the local ``mirrors`` only.

    ``mirrors`` are ``host:port`` strings (``"127.0.0.1:7888"``), all marked insecure (plain
    HTTP). The registry's own ``location`` is ``fallback_location`` (a closed local port by
    default), so the fallback containers/image makes after the mirrors fail never reaches the
    internet. Returns the path.
    """
    lines = [
        "# written by tests/support/clients.py: local mirrors only, no fallback off the machine",
        'unqualified-search-registries = ["docker.io"]',
        'short-name-mode = "permissive"',
        "",
        "[[registry]]",
        f'prefix = "{prefix}"',
        f'location = "{fallback_location}"',
        "insecure = true",
    ]
    for mirror in mirrors:
        lines += ["", "[[registry.mirror]]", f'location = "{mirror}"', "insecure = true"]
    out = Path(path)
    out.write_text("\n".join(lines) + "\n")
    return out


def podman_env(tmpdir: Path | str, registries_conf: Path | str | None = None) -> dict[str, str]:
    """The environment :func:`podman` runs with (isolated config, auth file and ``HOME``)."""
    base = Path(tmpdir)
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    containers_conf = base / "containers.conf"
    if not containers_conf.exists():
        containers_conf.write_text(
            '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n'
        )
    auth_file = base / "auth.json"
    if not auth_file.exists():
        auth_file.write_text('{"auths": {}}\n')
    if registries_conf is None:
        registries_conf = base / "registries-none.conf"
        if not Path(registries_conf).exists():
            Path(registries_conf).write_text(
                'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
            )
    return _clean_env(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "CONTAINERS_CONF": str(containers_conf),
            "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
            "REGISTRY_AUTH_FILE": str(auth_file),
        }
    )


def podman_runroot(tmpdir: Path | str) -> Path:
    """The short run root :func:`podman` uses for ``tmpdir`` (same dir for the same tmpdir)."""
    key = hashlib.sha256(str(Path(tmpdir).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"pyrsia-podman-{key}"


def podman_cleanup(tmpdir: Path | str) -> None:
    """Remove the run root of ``tmpdir`` (the rest lives in ``tmpdir`` itself)."""
    shutil.rmtree(podman_runroot(tmpdir), ignore_errors=True)


def podman(
    tmpdir: Path | str,
    *args: str,
    registries_conf: Path | str | None = None,
    timeout: float = 180.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``podman --root <tmpdir>/root --runroot <short dir> --storage-driver vfs <args>``.

    All podman state (image store, libpod tmp dir, config, ``HOME``) lives under ``tmpdir``,
    except the run root: podman refuses one longer than 50 characters, so it is
    :func:`podman_runroot` (``/tmp/pyrsia-podman-<hash of tmpdir>``); remove it with
    :func:`podman_cleanup` (the ``podman_dir`` fixture does). Reuse one ``tmpdir`` across calls
    to see the same image store. Give
    ``registries_conf`` (see :func:`write_registries_conf`) to pull ``docker.io/...`` through a
    local mirror; without it no registry is configured and short names are refused.

    Example: ``podman(tmp, "pull", "--tls-verify=false", f"{reg.host}/library/alpine:3.16.2")``.
    """
    base = Path(tmpdir)
    for sub in ("root", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    runroot = podman_runroot(base)
    runroot.mkdir(mode=0o700, parents=True, exist_ok=True)
    argv = [
        "podman",
        "--root",
        str(base / "root"),
        "--runroot",
        str(runroot),
        "--tmpdir",
        str(base / "tmp"),
        "--storage-driver",
        "vfs",
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "none",
        *args,
    ]
    return run_tool(argv, timeout=timeout, check=check, env=podman_env(base, registries_conf))
