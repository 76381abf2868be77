"""``pyrsia setup docker|podman|containerd|service``: the files it writes (on temp dirs), and
real podman and containerd pulls through a node configured by them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.clients import CLOSED_LOCAL_LOCATION, podman
from support.fixtures import SeededUpstream
from support.net import free_port
from support.node import NodeProcess, run_cli


def _setup(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(home, "setup", *args)


# --------------------------------------------------------------------------- docker


def test_docker_merges_into_daemon_json_keeps_other_keys_and_backs_up(tmp_path: Path) -> None:
    conf = tmp_path / "etc-docker"
    conf.mkdir()
    original = '{"log-level": "warn", "registry-mirrors": ["https://other.mirror"],\n' \
               ' "features": {"buildkit": true}}\n'
    (conf / "daemon.json").write_text(original)
    out = _setup(tmp_path, "docker", "--node", "127.0.0.1:7900", "--config-dir", str(conf))
    assert out.returncode == 0, out.stderr
    data = json.loads((conf / "daemon.json").read_text())
    assert data == {"log-level": "warn", "features": {"buildkit": True},
                    "registry-mirrors": ["http://127.0.0.1:7900", "https://other.mirror"]}
    assert (conf / "daemon.json.pyrsia-backup").read_text() == original
    assert "daemon.json" in out.stdout

    again = _setup(tmp_path, "docker", "--node", "127.0.0.1:7900", "--config-dir", str(conf))
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stdout
    assert json.loads((conf / "daemon.json").read_text()) == data

    undo = _setup(tmp_path, "docker", "--node", "127.0.0.1:7900", "--config-dir", str(conf),
                  "--undo")
    assert undo.returncode == 0, undo.stderr
    assert (conf / "daemon.json").read_text() == original  # byte for byte
    assert not (conf / "daemon.json.pyrsia-backup").exists()


def test_docker_undo_after_later_edits_removes_only_the_mirror(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    out = _setup(tmp_path, "docker", "--node", "127.0.0.1:7900", "--file", str(path))
    assert out.returncode == 0, out.stderr
    assert json.loads(path.read_text()) == {"registry-mirrors": ["http://127.0.0.1:7900"]}
    edited = json.loads(path.read_text())
    edited["debug"] = True
    path.write_text(json.dumps(edited))
    undo = _setup(tmp_path, "docker", "--node", "127.0.0.1:7900", "--file", str(path), "--undo")
    assert undo.returncode == 0, undo.stderr
    assert json.loads(path.read_text()) == {"debug": True}
    # Setup created the file; undone with nothing else in it, it is gone.
    path.write_text(json.dumps({"registry-mirrors": ["http://127.0.0.1:7900"]}))
    assert _setup(tmp_path, "docker", "--node", "127.0.0.1:7900", "--file", str(path),
                  "--undo").returncode == 0
    assert not path.exists()


def test_docker_dry_run_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    path.write_text('{"debug": true}')
    out = _setup(tmp_path, "docker", "--node", "10.1.2.3:7888", "--file", str(path), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert f"Would write {path}" in out.stdout
    assert '"http://10.1.2.3:7888"' in out.stdout and '"debug": true' in out.stdout
    assert path.read_text() == '{"debug": true}'
    assert not (tmp_path / "daemon.json.pyrsia-backup").exists()


@pytest.mark.parametrize("content, why", [("{not json", "not valid JSON"),
                                          ("[1, 2]", "not a JSON object"),
                                          ('{"registry-mirrors": "x"}', "not a list")])
def test_docker_refuses_an_invalid_daemon_json(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "daemon.json"
    path.write_text(content)
    out = _setup(tmp_path, "docker", "--node", "127.0.0.1:7900", "--file", str(path))
    assert out.returncode != 0
    assert str(path) in out.stderr and why in out.stderr
    assert "Traceback" not in out.stderr
    assert path.read_text() == content
    assert not (tmp_path / "daemon.json.pyrsia-backup").exists()


def test_docker_node_defaults_to_the_cli_target(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    out = run_cli(tmp_path, "setup", "docker", "--file", str(path), port=7931)
    assert out.returncode == 0, out.stderr
    assert json.loads(path.read_text())["registry-mirrors"] == ["http://127.0.0.1:7931"]
    env = {"PYRSIA_NODE": "127.0.0.1:7932"}
    out = run_cli(tmp_path, "setup", "docker", "--file", str(path), port=7931, env=env)
    assert json.loads(path.read_text())["registry-mirrors"][0] == "http://127.0.0.1:7932"


@pytest.mark.parametrize("target", ["docker", "podman", "containerd", "service"])
def test_unwritable_place_is_refused_clearly(tmp_path: Path, target: str) -> None:
    # Below a regular file nothing can be created, even as root.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    where = ["--file", str(blocker / "sub" / "conf")]
    extra = [] if target == "service" else ["--node", "127.0.0.1:7900"]
    out = _setup(tmp_path, target, *extra, *where)
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith("Error: cannot write "), out.stderr
    assert str(blocker) in out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- podman


def test_podman_drop_in_idempotent_and_undo(tmp_path: Path) -> None:
    conf = tmp_path / "containers"
    args = ["podman", "--node", "127.0.0.1:7900", "--config-dir", str(conf)]
    out = _setup(tmp_path, *args)
    assert out.returncode == 0, out.stderr
    path = conf / "registries.conf.d" / "50-pyrsia.conf"
    text = path.read_text()
    assert '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"' in text
    assert '[[registry.mirror]]\nlocation = "127.0.0.1:7900"\ninsecure = true' in text
    again = _setup(tmp_path, *args)
    assert "nothing to change" in again.stdout and path.read_text() == text
    # Another node: rewritten (no backup of our own older file).
    moved = _setup(tmp_path, "podman", "--node", "127.0.0.1:7901", "--config-dir", str(conf))
    assert moved.returncode == 0 and 'location = "127.0.0.1:7901"' in path.read_text()
    assert not (path.parent / "50-pyrsia.conf.pyrsia-backup").exists()
    undo = _setup(tmp_path, *args, "--undo")
    assert undo.returncode == 0, undo.stderr
    assert not path.exists()
    assert "nothing to undo" in _setup(tmp_path, *args, "--undo").stdout


def test_podman_keeps_a_foreign_file_as_backup_and_restores_it(tmp_path: Path) -> None:
    path = tmp_path / "50-pyrsia.conf"
    path.write_text("# mine\n")
    out = _setup(tmp_path, "podman", "--node", "127.0.0.1:7900", "--file", str(path),
                 "--fallback", "127.0.0.1:1")
    assert out.returncode == 0, out.stderr
    assert 'location = "127.0.0.1:1"' in path.read_text()
    assert (tmp_path / "50-pyrsia.conf.pyrsia-backup").read_text() == "# mine\n"
    assert _setup(tmp_path, "podman", "--node", "127.0.0.1:7900", "--file", str(path),
                  "--undo").returncode == 0
    assert path.read_text() == "# mine\n"
    refused = _setup(tmp_path, "podman", "--file", str(path), "--undo")
    assert refused.returncode == 1 and "was not written by" in refused.stderr
    assert path.read_text() == "# mine\n"


# --------------------------------------------------------------------------- containerd


def test_containerd_hosts_toml(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    args = ["containerd", "--node", "127.0.0.1:7900", "--config-dir", str(certs)]
    dry = _setup(tmp_path, *args, "--dry-run")
    assert dry.returncode == 0 and "Would write" in dry.stdout and not certs.exists()
    out = _setup(tmp_path, *args)
    assert out.returncode == 0, out.stderr
    text = (certs / "docker.io" / "hosts.toml").read_text()
    assert 'server = "https://registry-1.docker.io"' in text
    assert '[host."http://127.0.0.1:7900"]\n  capabilities = ["pull", "resolve"]' in text
    assert "nothing to change" in _setup(tmp_path, *args).stdout
    assert _setup(tmp_path, *args, "--undo").returncode == 0
    assert not (certs / "docker.io" / "hosts.toml").exists()


# --------------------------------------------------------------------------- service


def test_service_unit(tmp_path: Path) -> None:
    unit = tmp_path / "pyrsia.service"
    data = tmp_path / "data dir"
    args = ["service", "--file", str(unit), "--host", "0.0.0.0", "--port", "7999",
            "--data-dir", str(data), "--stop-timeout", "25"]
    out = _setup(tmp_path, *args)
    assert out.returncode == 0, out.stderr
    text = unit.read_text()
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    import shlex

    argv = shlex.split(exec_line.removeprefix("ExecStart="))
    assert Path(argv[0]).is_absolute() and os.access(argv[0], os.X_OK)
    start = argv.index("node")
    assert argv[start:] == ["node", "start", "--host", "0.0.0.0", "--port", "7999",
                            "--data-dir", str(data)]
    for line in ("Restart=on-failure", "KillSignal=SIGTERM", "TimeoutStopSec=25",
                 "WantedBy=multi-user.target"):
        assert line in text.splitlines()
    # systemctl is never called for --file: the commands are printed.
    assert "systemctl daemon-reload" in out.stdout
    # The ExecStart command really starts a node (the CLI parses it).
    check = subprocess.run([*argv[:start], "node", "start", "--help"], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and "--data-dir" in check.stdout
    assert "nothing to change" in _setup(tmp_path, *args).stdout
    assert _setup(tmp_path, *args, "--undo").returncode == 0 and not unit.exists()


# --------------------------------------------------------------------------- real clients


@pytest.fixture
def node(tmp_path: Path, seeded_upstream: SeededUpstream) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path / "node", upstream=seeded_upstream.url) as n:
        yield n


@pytest.mark.process
def test_podman_pulls_through_the_drop_in_setup_wrote(
    node: NodeProcess, seeded_upstream: SeededUpstream, podman_dir: Path, tmp_path: Path
) -> None:
    # podman() runs with HOME=<podman_dir>/home: the user's drop-in dir is under it.
    user_conf = podman_dir / "home" / ".config" / "containers"
    out = _setup(tmp_path, "podman", "--node", f"127.0.0.1:{node.port}", "--config-dir",
                 str(user_conf), "--fallback", CLOSED_LOCAL_LOCATION)
    assert out.returncode == 0, out.stderr
    assert (user_conf / "registries.conf.d" / "50-pyrsia.conf").exists()
    podman(podman_dir, "pull", "docker.io/library/alpine:3.16.2")
    digest = podman(podman_dir, "image", "inspect", "--format", "{{.Digest}}",
                    "docker.io/library/alpine:3.16.2").stdout.strip()
    assert digest == seeded_upstream.images["library/alpine:3.16.2"].manifest_digest
    assert "Fetching manifest for library/alpine:3.16.2" in node.log()


class Containerd:
    """A containerd daemon of the test's own: root, state and socket under ``base``.

    With ``cri_config_path`` its CRI plugin (the kubelet's API, on the same socket) runs too,
    reading each registry's ``hosts.toml`` under that directory on every pull; it uses the
    native snapshotter, empty CNI dirs of its own, a streaming server on 127.0.0.1 and a
    sandbox image on a closed local port (never pulled: no pod is run).
    """

    def __init__(self, base: Path, *, cri_config_path: Path | None = None) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.socket = base / "run" / "containerd.sock"
        self.config = base / "config.toml"
        cri = ['disabled_plugins = ["io.containerd.grpc.v1.cri"]'] if cri_config_path is None \
            else []
        self.config.write_text("\n".join([
            "version = 2",
            f'root = "{base / "root"}"',
            f'state = "{base / "state"}"',
            *cri,
            "[grpc]",
            f'  address = "{self.socket}"',
            "[ttrpc]",
            f'  address = "{base / "run" / "ttrpc.sock"}"',
            "[debug]",
            f'  address = "{base / "run" / "debug.sock"}"',
            "[metrics]",
            '  address = ""',
            *([] if cri_config_path is None else _cri_config(base, cri_config_path)),
            "",
        ]))
        self.log_path = base / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Containerd:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ctr("version", check=False).returncode == 0:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("containerd did not start:\n" + self.log_path.read_text())

    def ctr(self, *args: str, check: bool = True, namespace: str = "pyrsia-test"
            ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in
               ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        proc = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", namespace,
                               *args], capture_output=True, text=True, timeout=180, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stderr}\n{proc.stdout}")
        return proc

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _cri_config(base: Path, config_path: Path) -> list[str]:
    cri = '[plugins."io.containerd.grpc.v1.cri"'
    (base / "cni" / "bin").mkdir(parents=True, exist_ok=True)
    (base / "cni" / "conf").mkdir(parents=True, exist_ok=True)
    return [
        f"{cri}]",
        f'  sandbox_image = "{CLOSED_LOCAL_LOCATION}/pause:3.6"',
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        f"{cri}.containerd]",
        '  snapshotter = "native"',
        f"{cri}.cni]",
        f'  bin_dir = "{base / "cni" / "bin"}"',
        f'  conf_dir = "{base / "cni" / "conf"}"',
        f"{cri}.registry]",
        f'  config_path = "{config_path}"',
    ]


def _ctr_digest(daemon: Containerd, image: str) -> str:
    """The DIGEST column of ``ctr images list`` for ``image``."""
    rows = [line.split() for line in daemon.ctr("images", "list").stdout.splitlines()[1:]]
    found = [row[2] for row in rows if row and row[0] == image]
    assert len(found) == 1, rows
    return found[0]


@pytest.fixture
def containerd_pair(tmp_path: Path) -> Iterator[tuple[Containerd, Containerd]]:
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.fail("containerd is not installed (.ci/setup.sh installs it)")
    # Unix socket paths are limited to 108 bytes: keep them short.
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="pyrsia-ctrd-"))
    first = Containerd(base / "a").start()
    try:
        second = Containerd(base / "b").start()
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.process
def test_containerd_pulls_through_the_hosts_toml_setup_wrote(
    fresh_seeded_upstream: SeededUpstream, tmp_path: Path,
    containerd_pair: tuple[Containerd, Containerd],
) -> None:
    upstream = fresh_seeded_upstream
    closed = f"http://127.0.0.1:{free_port()}"  # no traffic off the machine if the node fails
    with NodeProcess(tmp_path / "node", upstream=upstream.url) as node:
        certs = tmp_path / "certs.d"
        out = _setup(tmp_path, "containerd", "--node", f"127.0.0.1:{node.port}",
                     "--config-dir", str(certs), "--fallback", closed)
        assert out.returncode == 0, out.stderr
        first, second = containerd_pair
        image = "docker.io/library/alpine:3.16.2"
        pull = ["images", "pull", "--hosts-dir", str(certs), "--snapshotter", "native"]
        first.ctr(*pull, image)
        want = upstream.images["library/alpine:3.16.2"].manifest_digest
        assert _ctr_digest(first, image) == want
        assert "Fetching manifest for library/alpine:3.16.2" in node.log()
        # A second containerd (its own content store) is served from the node's cache.
        mark = upstream.registry.mark()
        second.ctr(*pull, image)
        assert _ctr_digest(second, image) == want
        assert upstream.registry.requests_since(mark) == []
        # A registry the node does not mirror: the node refuses (?ns=quay.io), it never
        # passes Docker Hub's image off as quay.io's.
        quay = certs / "quay.io" / "hosts.toml"
        quay.parent.mkdir()
        quay.write_text((certs / "docker.io" / "hosts.toml").read_text())
        refused = second.ctr(*pull, "quay.io/library/alpine:3.16.2", check=False)
        assert refused.returncode != 0
        assert "Refused quay.io/library/alpine: this node mirrors docker.io only" in node.log()
        # A multi-arch image: containerd picks its platform from the index.
        second.ctr(*pull, "--platform", "linux/arm64/v8", "docker.io/library/multi:1.0")
        assert _ctr_digest(second, "docker.io/library/multi:1.0") == upstream.images[
            "library/multi:1.0"].manifest_digest


@pytest.mark.process
def test_node_answers_only_for_the_docker_io_namespace(node: NodeProcess) -> None:
    import httpx

    path = "/v2/library/alpine/manifests/3.16.2"
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    ok = httpx.get(node.url + path + "?ns=docker.io", headers=accept, timeout=60)
    assert ok.status_code == 200 and ok.headers["docker-content-digest"].startswith("sha256:")
    for ns in ("quay.io", "ghcr.io", "docker.io.evil"):
        refused = httpx.get(node.url + path + f"?ns={ns}", headers=accept, timeout=60)
        assert refused.status_code == 404
        error = refused.json()["errors"][0]
        assert error["code"] == "NAME_UNKNOWN" and ns in error["message"]
    blob = httpx.get(node.url + "/v2/library/alpine/blobs/sha256:" + "0" * 64 + "?ns=quay.io",
                     timeout=60)
    assert blob.status_code == 404 and blob.json()["errors"][0]["code"] == "NAME_UNKNOWN"


@pytest.mark.process
def test_the_service_unit_starts_a_node_that_stops_cleanly(tmp_path: Path) -> None:
    """What systemd would do with the unit: run ExecStart, probe it, send KillSignal."""
    import shlex
    import signal

    import httpx
    from support.net import wait_for_http

    port = free_port()
    unit = tmp_path / "pyrsia.service"
    out = _setup(tmp_path, "service", "--file", str(unit), "--port", str(port), "--data-dir",
                 str(tmp_path / "data"), "--node-arg=--no-upstream")
    assert out.returncode == 0, out.stderr
    lines = unit.read_text().splitlines()
    argv = shlex.split(next(x for x in lines if x.startswith("ExecStart="))[len("ExecStart="):])
    assert "KillSignal=SIGTERM" in lines
    stop = int(next(x for x in lines if x.startswith("TimeoutStopSec="))[15:])
    assert stop > 10  # longer than the node's drain bound
    log = open(tmp_path / "service.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", 30, process=proc)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(stop) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert (tmp_path / "data" / "ledger").is_dir()
