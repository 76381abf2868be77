"""What a newcomer meets in the first hour with more than one node (issue: hardening).

Each test names the fault it guards. Real node processes on 127.0.0.1, driven by the
``pyrsia`` CLI as a user types it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support.clients import skopeo
from support.fixtures import SeededUpstream
from support.net import free_port
from support.node import NodeProcess, node_status, run_cli, wait_until

pytestmark = pytest.mark.process
FAST = ("--sync-interval", "0.5")
status = node_status


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text


def cli(home: Path, *args: str, node: NodeProcess | None = None, timeout: float = 120,
        env: dict[str, str] | None = None, input: str | None = None) -> str:
    """Run ``pyrsia ARGS`` (``--node`` names ``node``); it must succeed; its stdout."""
    extra = ["--node", f"127.0.0.1:{node.port}"] if node is not None else []
    out = run_cli(home, *args, *extra, timeout=timeout, env=env, input=input)
    assert out.returncode == 0, f"pyrsia {' '.join(args)}: {out.stderr}"
    no_traceback(out.stderr)
    return out.stdout


def listed(home: Path, node: NodeProcess) -> set[str]:
    """The node ids ``pyrsia list --json`` shows."""
    return {p["node_id"] for p in json.loads(cli(home, "list", "--json", node=node))}


def build_state(home: Path, node: NodeProcess, build_id: str) -> dict[str, object]:
    """``pyrsia build status --id ID --json`` (exit 1 once the build FAILED)."""
    out = run_cli(home, "build", "status", "--id", build_id, "--json", "--node",
                  f"127.0.0.1:{node.port}")
    no_traceback(out.stderr)
    got: dict[str, object] = json.loads(out.stdout)
    assert out.returncode == (1 if got["status"] == "FAILED" else 0), out.stderr
    return got


def build_commits(home: Path, node: NodeProcess, image: str, timeout: float = 90) -> None:
    out = cli(home, "build", "docker", "--image", image, "--json", node=node)
    build_id = json.loads(out)["build_id"]

    def done() -> bool:
        got = build_state(home, node, build_id)
        assert got["status"] != "FAILED", got
        return bool(got["status"] == "SUCCESS")

    wait_until(f"the build of {image} to commit", done, timeout)


# -- faults 1 and 2: join, authorize, deauthorize ---------------------------------------------


def test_four_nodes_join_authorize_deauthorize(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    """4 nodes join one by one; each lists exactly the other 3 (no phantom of the join);
    3 are authorized (the first two with --force, which a small network needs), one is
    deauthorized, and the remaining build nodes keep committing. An authorization of an
    id that never proved its key is refused."""
    up = fresh_seeded_upstream.url
    nodes: list[NodeProcess] = []
    try:
        a = NodeProcess(tmp_path / "a", upstream=up, extra=FAST).start()
        nodes.append(a)
        for name in "bcd":
            nodes.append(NodeProcess(tmp_path / name, upstream=up,
                                     extra=(*FAST, "--peer", a.url)).start())
        ids = {n.port: status(n)["node_id"] for n in nodes}
        for n in nodes:
            others = {ids[m.port] for m in nodes if m is not n}
            wait_until(f"{n.url} to list exactly the other 3 nodes",
                       lambda n=n, others=others: listed(tmp_path, n) == others, 30)
        time.sleep(1.5)  # a few more sync rounds: no phantom appears later either
        for n in nodes:
            assert listed(tmp_path, n) == {ids[m.port] for m in nodes if m is not n}

        admin = ("--data-dir", str(a.data_dir))
        # An id no node holds, and one whose holder never joined: refused, nothing committed.
        height = status(a)["ledger_height"]
        for fake in ("ab" * 32, ids[a.port][::-1]):
            out = run_cli(tmp_path, "authorize", "--peer", fake, *admin, "--node",
                          f"127.0.0.1:{a.port}")
            assert out.returncode != 0 and "not a known peer" in out.stderr, out.stderr
            no_traceback(out.stderr)
        assert status(a)["ledger_height"] == height

        b, c, d = nodes[1:]
        # From one build node to two, the new one would be needed for every block.
        out = run_cli(tmp_path, "authorize", "--peer", ids[b.port], *admin, "--node",
                      f"127.0.0.1:{a.port}")
        assert out.returncode != 0 and "--force" in out.stderr and "2 must sign" in out.stderr
        assert status(a)["authorized_build_nodes"] == [ids[a.port]]
        cli(tmp_path, "authorize", "--peer", ids[b.port], "--force", *admin, node=a)
        cli(tmp_path, "authorize", "--peer", ids[c.port], "--force", *admin, node=a)
        # The fourth keeps a quorum (3 of 4) without the new node: no --force needed.
        out = cli(tmp_path, "authorize", "--peer", ids[d.port], *admin, node=a)
        assert "is now an authorized build node" in out and "4 build nodes" in out
        for n in nodes:
            wait_until(f"{n.url} to know 4 build nodes",
                       lambda n=n: len(status(n)["authorized_build_nodes"]) == 4)
        build_commits(tmp_path, b, "library/alpine:3.16.2")

        # Deauthorize D (run on A, committed by consensus); the other three keep building.
        out = cli(tmp_path, "deauthorize", "--peer", ids[d.port], *admin, node=a)
        assert "is no longer a build node" in out and "3 build nodes" in out
        three = {ids[a.port], ids[b.port], ids[c.port]}
        for n in nodes:
            wait_until(f"{n.url} to know 3 build nodes",
                       lambda n=n: set(status(n)["authorized_build_nodes"]) == three)
        d.stop()  # D is gone for good: the remaining build nodes do not need it
        build_commits(tmp_path, c, "library/multi:1.0")
        heights = {status(n)["ledger_head"] for n in nodes[:3]}
        assert len(heights) == 1
        # With C down, deauthorizing B would leave A and C, which must both sign: refused
        # without --force, and nothing changes.
        c.stop()
        out = run_cli(tmp_path, "deauthorize", "--peer", ids[b.port], *admin, "--node",
                      f"127.0.0.1:{a.port}")
        assert out.returncode != 0 and "--force" in out.stderr and "2 must sign" in out.stderr
        assert set(status(a)["authorized_build_nodes"]) == three
        # Not a build node: a clear error.
        out = run_cli(tmp_path, "deauthorize", "--peer", ids[d.port], *admin, "--node",
                      f"127.0.0.1:{a.port}")
        assert out.returncode != 0 and "not an authorized build node" in out.stderr
    finally:
        for n in nodes:
            n.stop()


# -- fault 3: a stalled consensus is visible ------------------------------------------------


def test_stalled_consensus_is_reported_and_builds_get_a_deadline(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    up = fresh_seeded_upstream.url
    extra = (*FAST, "--consensus-timeout", "9")
    with NodeProcess(tmp_path / "a", upstream=up, extra=extra) as a, \
            NodeProcess(tmp_path / "b", upstream=up, extra=(*extra, "--peer", a.url)) as b:
        b_id = status(b)["node_id"]
        cli(tmp_path, "authorize", "--peer", b_id, "--force", "--data-dir", str(a.data_dir),
            node=a)
        wait_until("b to be a build node", lambda: status(b)["is_build_node"])
        b.stop()
        started = time.monotonic()
        build_id = json.loads(cli(tmp_path, "build", "docker", "--image", "library/alpine:3.16.2",
                                  "--json", node=a))["build_id"]

        def state() -> dict[str, object]:
            return build_state(tmp_path, a, build_id)

        wait_until("the build to wait for a quorum",
                   lambda: state()["status"] == "WAITING_FOR_QUORUM", 30)
        assert isinstance(state()["deadline"], int)
        wait_until("the build status to name the missing build node",
                   lambda: b_id in str(state()["reason"]), 30)
        text = cli(tmp_path, "status", node=a)
        assert "consensus stalled" in text and b_id in text
        stall = status(a)["consensus_stall"]
        assert stall["missing_build_nodes"] == [b_id] and stall["needed"] == 2
        assert "Consensus stalled: block" in a.log() and b_id in a.log()
        # The deadline: the build fails, saying why, and nothing was committed.
        wait_until("the build to fail at its deadline", lambda: state()["status"] == "FAILED", 30)
        assert time.monotonic() - started < 40
        assert b_id in str(state()["reason"]) and "consensus" in str(state()["reason"])
        out = run_cli(tmp_path, "build", "status", "--id", build_id, "--node",
                      f"127.0.0.1:{a.port}")
        assert out.returncode != 0 and "FAILED" in out.stdout


# -- fault 4: the disk space of `pyrsia config -e` reaches the node -----------------------------


def test_config_disk_space_reaches_the_node(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"PYRSIA_HOME": str(data)}
    with NodeProcess(tmp_path / "n", data_dir=data) as n:
        # The dialogue of the seed, pointing the CLI at the node and giving it 5 MB.
        out = cli(tmp_path, "config", "-e", input=f"127.0.0.1\n{n.port}\n5 MB\n", env=env)
        assert out.endswith("Node configuration Saved !!\n")
        assert status(n)["disk_allocated"] == 5_000_000
        assert "Total disk space allocated: 5.00 MB" in cli(tmp_path, "status", env=env)
    saved = json.loads((data / "settings.json").read_text())
    assert saved["disk_space"] == 5_000_000
    # Kept across a restart of the node (no --disk-space given).
    with NodeProcess(tmp_path / "n", data_dir=data) as n:
        assert status(n)["disk_allocated"] == 5_000_000
    # With the node stopped, the setting goes to its data dir for the next start.
    cli(tmp_path, "config", "--disk-space", "7 MB", env=env)
    with NodeProcess(tmp_path / "n", data_dir=data) as n:
        assert status(n)["disk_allocated"] == 7_000_000
        # Without the admin token the node refuses the change, and says so.
        out = run_cli(tmp_path, "config", "--disk-space", "1 MB", "--node",
                      f"127.0.0.1:{n.port}", "--token", "wrong")
        assert out.returncode != 0 and "admin token" in out.stderr
        assert status(n)["disk_allocated"] == 7_000_000
    # An explicit --disk-space at start wins, and is kept.
    with NodeProcess(tmp_path / "n", data_dir=data, extra=("--disk-space", "3 MB")) as n:
        assert status(n)["disk_allocated"] == 3_000_000
    assert json.loads((data / "settings.json").read_text())["disk_space"] == 3_000_000


# -- fault 6: peers that are gone, and a human time ---------------------------------------------


def test_list_shows_a_human_last_seen(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "a", extra=FAST) as a, \
            NodeProcess(tmp_path / "b", extra=(*FAST, "--peer", a.url)) as b:
        wait_until("a to list b", lambda: status(b)["node_id"] in listed(tmp_path, a))
        text = cli(tmp_path, "list", node=a)
        assert "LAST SEEN" in text and " s ago" in text, text
        line = next(ln for ln in text.splitlines() if status(b)["node_id"] in ln)
        assert str(int(time.time()))[:6] not in line  # no raw epoch number


# -- fault 7: which node the CLI talks to --------------------------------------------------------


def test_every_command_targets_the_node_it_is_told(
    tmp_path: Path, seeded_upstream: SeededUpstream
) -> None:
    with NodeProcess(tmp_path / "a", upstream=seeded_upstream.url, extra=FAST) as a, \
            NodeProcess(tmp_path / "b", extra=(*FAST, "--peer", a.url)) as b:
        a_id, b_id = status(a)["node_id"], status(b)["node_id"]
        # --node, PYRSIA_NODE, and PYRSIA_HOME of the node running from that data dir.
        assert b_id in cli(tmp_path, "ping", node=b)
        assert b_id in cli(tmp_path, "ping", env={"PYRSIA_NODE": f"127.0.0.1:{b.port}"})
        assert b_id in cli(tmp_path, "ping", env={"PYRSIA_NODE": f"http://127.0.0.1:{b.port}/"})
        assert b_id in cli(tmp_path, "status", env={"PYRSIA_HOME": str(b.data_dir)})
        assert a_id in cli(tmp_path, "status", env={"PYRSIA_HOME": str(a.data_dir)})
        # --node wins over PYRSIA_NODE.
        assert a_id in cli(tmp_path, "ping", node=a, env={"PYRSIA_NODE": f"127.0.0.1:{b.port}"})
        # A bad address is a usage error naming it.
        out = run_cli(tmp_path, "status", "--node", "127.0.0.1:99999")
        assert out.returncode == 2 and "99999" in out.stderr
        # A stopped node: the message says which node and where the CLI got it from.
        closed = free_port()
        out = run_cli(tmp_path, "status", env={"PYRSIA_NODE": f"127.0.0.1:{closed}"})
        assert out.returncode == 1 and str(closed) in out.stderr and "PYRSIA_NODE" in out.stderr

        # A build requested through B (a regular node) runs on A; its id is answered by
        # B (which forwarded it), by A (which runs it), and by a node that did neither.
        build_id = json.loads(cli(tmp_path, "build", "docker", "--image", "library/multi:1.0",
                                  "--json", node=b))["build_id"]
        with NodeProcess(tmp_path / "c", extra=(*FAST, "--peer", a.url)) as c:
            wait_until("c to know a", lambda: a_id in listed(tmp_path, c))
            for n in (b, a, c):
                got = json.loads(cli(tmp_path, "build", "status", "--id", build_id, "--json",
                                     node=n))
                assert got["build_id"] == build_id and got["package_specific_id"] == "multi:1.0"
        # An id no build node knows: 404 in words.
        out = run_cli(tmp_path, "build", "status", "--id", "0" * 8 + "-0000-0000-0000-" + "0" * 12,
                      "--node", f"127.0.0.1:{b.port}")
        assert out.returncode == 1 and "no build with id" in out.stderr
        # A pull of an unknown image through B names a build id that B answers for.
        with httpx.Client(base_url=b.url, timeout=30) as client:
            r = client.get("/v2/library/alpine/manifests/3.16.2",
                           headers={"Accept": "application/vnd.oci.image.index.v1+json"})
        if r.status_code == 404:
            message = r.json()["errors"][0]["message"]
            forwarded = message.split("build ")[1].split(" ")[0]
            got = json.loads(cli(tmp_path, "build", "status", "--id", forwarded, "--json", node=b))
            assert got["package_specific_id"] == "alpine:3.16.2"


# -- fault 9: a failed start leaves nothing behind and names the right cause ---------------------


def test_failed_starts_create_nothing_and_name_the_cause(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_cli(tmp_path, "node", "start", "-p", str(port), "--data-dir", str(data),
                      "--no-upstream", timeout=30)
    assert out.returncode != 0 and f"127.0.0.1:{port}" in out.stderr and "in use" in out.stderr
    assert not data.exists()  # no identity, no genesis: nothing was created
    no_traceback(out.stderr)

    for bad, why in (("/proc/nope", "/proc"), (str(tmp_path / "file" / "data"), "file")):
        (tmp_path / "file").write_text("not a directory")
        out = run_cli(tmp_path, "node", "start", "-p", str(free_port()), "--data-dir", bad,
                      "--no-upstream", timeout=30)
        assert out.returncode != 0, out.stderr
        assert f"data directory {bad}" in out.stderr and why in out.stderr, out.stderr
        assert "127.0.0.1" not in out.stderr  # the address was fine
        no_traceback(out.stderr)


# -- fault 10: the smaller ones ------------------------------------------------------------------


def test_broken_cli_config_names_its_path_and_config_e_repairs_it(tmp_path: Path) -> None:
    cfg = tmp_path / "config" / "pyrsia" / "cli.json"
    for broken in ('{"port": 99999}', "{not json", '["a list"]'):
        env = {"PYRSIA_CLI_CONFIG": str(cfg)}
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(broken)
        out = run_cli(tmp_path, "status", env=env)
        assert out.returncode == 2 and str(cfg) in out.stderr, out.stderr
        assert "pyrsia config -e" in run_cli(tmp_path, "config", "--show", env=env).stderr
        port = free_port()
        out = run_cli(tmp_path, "config", "-e", input=f"127.0.0.1\n{port}\n10 GB\n", env=env)
        assert out.returncode == 0 and "Node configuration Saved !!" in out.stdout, out.stderr
        assert json.loads(cfg.read_text())["port"] == port


def test_transport_option_for_a_transport_not_in_use(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "node", "start", "-p", str(free_port()), "--data-dir",
                  str(tmp_path / "data"), "--no-upstream", "--transport-option", "quic.x=1",
                  timeout=30)
    assert out.returncode != 0 and "quic" in out.stderr and "--transport" in out.stderr
    assert not (tmp_path / "data").exists()
    no_traceback(out.stderr)


@pytest.mark.parametrize("size", ["999999999 TB", "2000000 TB"])
def test_disk_space_larger_than_any_disk(tmp_path: Path, size: str) -> None:
    out = run_cli(tmp_path, "config", "--disk-space", size)
    assert out.returncode == 2 and "larger than any disk" in out.stderr
    out = run_cli(tmp_path, "node", "start", "-p", str(free_port()), "--data-dir",
                  str(tmp_path / "data"), "--no-upstream", "--disk-space", size, timeout=30)
    assert out.returncode != 0 and "larger than any disk" in out.stderr


def test_build_subcommands_have_their_own_help(tmp_path: Path) -> None:
    docker = cli(tmp_path, "build", "docker", "--help")
    maven = cli(tmp_path, "build", "maven", "--help")
    state = cli(tmp_path, "build", "status", "--help")
    assert "--image" in docker and "--gav" not in docker and "--id" not in docker
    assert "--gav" in maven and "--image" not in maven
    assert "--id" in state and "--image" not in state and "--gav" not in state
    out = run_cli(tmp_path, "build", "docker")
    assert out.returncode == 2 and "--image" in out.stderr
    assert "how much the node logs" in cli(tmp_path, "node", "start", "--help")
    for command in ("status", "list"):
        assert "print the node's JSON" in cli(tmp_path, command, "--help")


def test_log_lines_banner_and_upstream_errors(
    tmp_path: Path, seeded_upstream: SeededUpstream
) -> None:
    info = seeded_upstream["library/alpine:3.16.2"]
    with NodeProcess(tmp_path / "a", upstream=seeded_upstream.url) as a:
        # The banner names the upstream.
        assert f"(upstream: docker {seeded_upstream.url}" in a.log()
        skopeo("inspect", "--tls-verify=false", "--raw",
               f"docker://127.0.0.1:{a.port}/library/alpine@{info.manifest_digest}")
        # A digest reference is spelled name@sha256:..., never name:sha256:...
        assert f"library/alpine@{info.manifest_digest}" in a.log()
        assert f"library/alpine:{info.manifest_digest}" not in a.log()
    closed = free_port()
    with NodeProcess(tmp_path / "b", upstream=f"http://127.0.0.1:{closed}") as b:
        r = httpx.get(f"{b.url}/v2/library/nothing/manifests/1.0", timeout=30)
        assert r.status_code >= 400
        message = json.dumps(r.json())
        assert "ConnectError(" not in message and "Errno" not in message.split("(")[0]
        assert f"127.0.0.1:{closed}" in message and "cannot connect" in message, message


def test_maven_upstream_error_names_the_host(tmp_path: Path) -> None:
    closed = free_port()
    with NodeProcess(tmp_path / "m", extra=(
            "--package-option", f"maven.upstream=http://127.0.0.1:{closed}/maven2")) as m:
        assert f"maven http://127.0.0.1:{closed}/maven2" in m.log()  # the banner too
        out = run_cli(tmp_path, "build", "maven", "--gav", "junit:junit:4.13.2", "--json",
                      "--node", f"127.0.0.1:{m.port}")
        assert out.returncode == 0, out.stderr
        build_id = json.loads(out.stdout)["build_id"]

        wait_until("the maven build to fail",
                   lambda: build_state(tmp_path, m, build_id)["status"] == "FAILED", 60)
        reason = str(build_state(tmp_path, m, build_id)["reason"])
        assert f"127.0.0.1:{closed}" in reason, reason


def test_format_ago() -> None:
    from pyrsia_cli import _main

    now = 1_000_000.0
    assert _main.format_ago(now - 12, now) == "12 s ago"
    assert _main.format_ago(now - 600, now) == "10 min ago"
    assert _main.format_ago(now - 7200, now) == "2 h ago"
    assert _main.format_ago(None, now) == "never"
    assert _main.format_ago(0, now) == "never"
    assert os.sep not in _main.format_ago(now - 10 * 86400, now)


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    """``pyrsia completion bash | true``: the reader is gone before the CLI writes; the CLI
    exits quietly (as ``pyrsia status | head -3`` does when the reader stops early)."""
    env = dict(os.environ, PYRSIA_CLI_CONFIG=str(tmp_path / "cli.json"))
    out = subprocess.run(
        f"{sys.executable} -m pyrsia_cli completion bash | true", shell=True,
        capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0
    no_traceback(out.stderr)
    assert "Exception ignored" not in out.stderr, out.stderr
