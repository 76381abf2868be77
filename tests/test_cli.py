"""The ``pyrsia`` CLI as a user runs it: a subprocess with its own config dir, a real node."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.fixtures import SeededUpstream
from support.net import free_port
from support.node import NodeProcess, run_cli

pytestmark = pytest.mark.process

HOST_PROMPT = "Enter host: [{}]\n\n"
PORT_PROMPT = "Enter port: [{}]\n\n"
DISK_PROMPT = ("Enter disk space to be allocated to pyrsia(Please enter with units ex: 10 GB): "
               "[{}]\n\n")
SAVED = "Node configuration Saved !!\n"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory,
         seeded_upstream: SeededUpstream) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path_factory.mktemp("cli-node"), upstream=seeded_upstream.url) as n:
        yield n


def no_traceback(out: str) -> None:
    assert "Traceback" not in out and 'File "' not in out, out


def cli_json(path: Path) -> dict[str, object]:
    return dict(json.loads(path.read_text()))


# -- pyrsia config ----------------------------------------------------------------------------


def test_config_edit_defaults(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "config", "-e", input="\n\n\n")
    assert out.returncode == 0, out.stderr
    # Exactly the seed's dialogue.
    assert out.stdout == (HOST_PROMPT.format("localhost") + PORT_PROMPT.format(7888)
                          + DISK_PROMPT.format("10 GB") + SAVED)
    cfg = tmp_path / "config" / "pyrsia" / "cli.json"
    assert cli_json(cfg) == {"host": "localhost", "port": 7888, "disk_allocated": "10 GB"}
    # End of input also accepts the defaults (no hang, no traceback).
    out = run_cli(tmp_path, "config", "-e", input="")
    assert out.returncode == 0 and out.stdout.endswith(SAVED)
    no_traceback(out.stderr)


def test_config_edit_values_and_show(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "config", "-e", input="node.example.org\n9000\n 20  GB \n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(SAVED)
    show = run_cli(tmp_path, "config", "--show")
    assert show.returncode == 0
    assert json.loads(show.stdout) == {"host": "node.example.org", "port": 9000,
                                       "disk_allocated": "20 GB"}
    # The saved values are the next dialogue's defaults.
    out = run_cli(tmp_path, "config", "-e", input="\n\n\n")
    assert out.stdout == (HOST_PROMPT.format("node.example.org") + PORT_PROMPT.format(9000)
                          + DISK_PROMPT.format("20 GB") + SAVED)
    out = run_cli(tmp_path, "config", "-e", input="::1\n65535\n1.5 GB\n")
    assert json.loads(run_cli(tmp_path, "config", "--show").stdout) == {
        "host": "::1", "port": 65535, "disk_allocated": "1.5 GB"}


def test_config_edit_reprompts_on_invalid_values(tmp_path: Path) -> None:
    answers = ["bad host!", "-leading.dash", "", "0", "99999", "abc", "", "ten", "10", "-1 GB",
               "5 GB"]
    out = run_cli(tmp_path, "config", "-e", input="\n".join(answers) + "\n")
    assert out.returncode == 0, out.stderr
    no_traceback(out.stdout + out.stderr)
    text = out.stdout
    assert text.count("Enter host: [localhost]") == 3
    assert text.count("Enter port: [7888]") == 4
    assert text.count("Enter disk space to be allocated to pyrsia") == 4
    assert "invalid host 'bad host!'" in text
    assert re.search(r"invalid port .*1 to 65535", text)
    assert "invalid size 'ten'" in text and "10 GB" in text
    assert text.endswith(SAVED)
    assert cli_json(tmp_path / "config" / "pyrsia" / "cli.json") == {
        "host": "localhost", "port": 7888, "disk_allocated": "5 GB"}


def test_config_file_location(tmp_path: Path) -> None:
    explicit = tmp_path / "elsewhere" / "my.json"
    out = run_cli(tmp_path, "config", "--port", "7999",
                  env={"PYRSIA_CLI_CONFIG": str(explicit)})
    assert out.returncode == 0, out.stderr
    assert cli_json(explicit)["port"] == 7999
    assert not (tmp_path / "config" / "pyrsia" / "cli.json").exists()
    # Without PYRSIA_CLI_CONFIG: $XDG_CONFIG_HOME/pyrsia/cli.json.
    xdg = tmp_path / "xdg"
    out = run_cli(tmp_path, "config", "-e", input="h1\n7001\n\n",
                  env={"PYRSIA_CLI_CONFIG": "", "XDG_CONFIG_HOME": str(xdg)})
    assert out.returncode == 0, out.stderr
    assert cli_json(xdg / "pyrsia" / "cli.json") == {"host": "h1", "port": 7001,
                                                     "disk_allocated": "10 GB"}
    shown = run_cli(tmp_path, "config", "--show",
                    env={"PYRSIA_CLI_CONFIG": "", "XDG_CONFIG_HOME": str(xdg)})
    assert json.loads(shown.stdout)["host"] == "h1"


def test_config_broken_file(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.json"
    cfg.write_text("{not json")
    out = run_cli(tmp_path, "config", "--show", env={"PYRSIA_CLI_CONFIG": str(cfg)})
    assert out.returncode != 0
    assert str(cfg) in out.stderr
    no_traceback(out.stderr)


# -- talking to a node ------------------------------------------------------------------------


def test_ping_status_list(node: NodeProcess, tmp_path: Path) -> None:
    ping = run_cli(tmp_path, "ping", port=node.port)
    assert ping.returncode == 0, ping.stderr
    assert "Connection Successful" in ping.stdout
    data = json.loads(run_cli(tmp_path, "status", "--json", port=node.port).stdout)
    for key, kind in [("node_id", str), ("node_public_key", str), ("peer_addresses", list),
                      ("authorized_build_nodes", list), ("ledger_height", int),
                      ("peers_count", int), ("artifact_count", int), ("disk_allocated", int),
                      ("disk_usage", int)]:
        assert isinstance(data[key], kind), key
    assert re.fullmatch(r"[0-9a-f]{64}", data["node_id"])
    assert data["node_id"] in data["authorized_build_nodes"]  # a network of one
    assert node.url in data["peer_addresses"]
    assert data["disk_allocated"] == 10 * 10**9
    text = run_cli(tmp_path, "status", port=node.port)
    assert text.returncode == 0, text.stderr
    lines = dict(line.split(":", 1) for line in text.stdout.strip().splitlines())
    lines = {k.strip(): v.strip() for k, v in lines.items()}
    assert lines["Node id"] == data["node_id"]
    assert lines["Connected peers count"] == "0"
    assert int(lines["Artifacts count"]) >= 0
    assert lines["Total disk space allocated"] == "10.00 GB"
    assert lines["Disk space used"].endswith("of 10.00 GB", 0, lines["Disk space used"].index(" ("))
    assert lines["Ledger height"].split()[0].isdigit()
    listed = run_cli(tmp_path, "list", port=node.port)
    assert listed.returncode == 0 and "No peers" in listed.stdout
    listed = run_cli(tmp_path, "list", "--json", port=node.port)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def wait_build(tmp_path: Path, port: int, build_id: str, timeout: float = 30) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        out = run_cli(tmp_path, "build", "status", "--id", build_id, "--json", port=port)
        data = json.loads(out.stdout)
        if data["status"] != "RUNNING":
            return dict(data)
        assert time.monotonic() < deadline, data
        time.sleep(0.2)


def test_build(node: NodeProcess, tmp_path: Path) -> None:
    before = json.loads(run_cli(tmp_path, "status", "--json", port=node.port).stdout)
    out = run_cli(tmp_path, "build", "docker", "--image", "alpine:3.16.2", port=node.port)
    assert out.returncode == 0, out.stderr
    m = re.search(r"Build with ID (\S+) has been requested", out.stdout)
    assert m, out.stdout
    build_id = m[1]
    data = wait_build(tmp_path, node.port, build_id)
    assert data["status"] == "SUCCESS", data
    assert data["package_specific_id"] == "alpine:3.16.2"
    text = run_cli(tmp_path, "build", "status", "--id", build_id, port=node.port)
    assert text.returncode == 0 and "SUCCESS" in text.stdout and build_id in text.stdout
    after = json.loads(run_cli(tmp_path, "status", "--json", port=node.port).stdout)
    assert after["ledger_height"] == before["ledger_height"] + 1
    assert after["artifact_count"] > before["artifact_count"]
    # Again: already in the log.
    again = run_cli(tmp_path, "build", "docker", "--image", "alpine:3.16.2", port=node.port)
    assert again.returncode != 0
    assert "Artifact already exists" in again.stderr
    no_traceback(again.stderr)
    # Not in the upstream: the build fails, with a reason.
    out = run_cli(tmp_path, "build", "docker", "--image", "alpine:0.0.404", port=node.port)
    assert out.returncode == 0, out.stderr
    failed_id = re.search(r"Build with ID (\S+) has been requested", out.stdout)[1]  # type: ignore[index]
    data = wait_build(tmp_path, node.port, failed_id)
    assert data["status"] == "FAILED" and "not found" in data["reason"], data
    text = run_cli(tmp_path, "build", "status", "--id", failed_id, port=node.port)
    assert text.returncode != 0 and "FAILED" in text.stdout and "not found" in text.stdout
    # An unknown id, an invalid image.
    unknown = run_cli(tmp_path, "build", "status", "--id", "no-such-build", port=node.port)
    assert unknown.returncode != 0 and "no build with id" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    invalid = run_cli(tmp_path, "build", "docker", "--image", "Not An Image", port=node.port)
    assert invalid.returncode != 0 and invalid.stderr.startswith("Error:")
    for out in (unknown, invalid):
        no_traceback(out.stderr)


# -- errors -----------------------------------------------------------------------------------


COMMANDS = [
    ["ping"], ["status"], ["status", "--json"], ["list"], ["list", "--json"],
    ["inspect-log", "docker", "--image", "alpine:3.16.2"],
    ["build", "docker", "--image", "alpine:3.16.2"], ["build", "status", "--id", "x"],
]


def test_every_command_against_a_node_that_is_not_running(tmp_path: Path) -> None:
    port = free_port()

    def one(args: list[str]) -> tuple[list[str], int, str, str]:
        out = run_cli(tmp_path, *args, port=port)
        return args, out.returncode, out.stdout, out.stderr

    with ThreadPoolExecutor(len(COMMANDS)) as pool:
        results = list(pool.map(one, COMMANDS))
    for args, code, stdout, stderr in results:
        assert code != 0, args
        assert stdout == "", args
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, (args, stderr)
        assert f"127.0.0.1:{port}" in lines[0] and "pyrsia node start" in lines[0], (args, stderr)
        no_traceback(stderr)


def test_something_else_on_the_port(tmp_path: Path, seeded_upstream: SeededUpstream) -> None:
    # A registry, not a pyrsia node: a clear error, not a traceback.
    for args in (["ping"], ["status"], ["build", "status", "--id", "x"]):
        out = run_cli(tmp_path, *args, port=seeded_upstream.registry.port)
        assert out.returncode != 0, args
        assert out.stderr.startswith("Error:"), out.stderr
        no_traceback(out.stderr)


@pytest.mark.parametrize("args", [
    ["config", "--port", "abc"], ["config", "--port", "0"], ["config", "--host", "bad host"],
    ["config", "--disk-space", "ten"], ["inspect-log", "docker"],
    ["inspect-log", "rpm", "--image", "x"], ["build", "nope"], ["status", "--bogus"],
    ["node", "start", "-p", "abc"], ["frobnicate"], ["node"], [],
])
def test_bad_arguments_exit_2_with_usage(tmp_path: Path, args: list[str]) -> None:
    out = run_cli(tmp_path, *args)
    assert out.returncode == 2, (args, out.stdout, out.stderr)
    assert "usage:" in out.stderr
    no_traceback(out.stderr)
    assert not (tmp_path / "config" / "pyrsia" / "cli.json").exists()


def test_help(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "--help")
    assert out.returncode == 0
    for command in ("node", "config", "ping", "status", "list", "inspect-log", "build"):
        assert command in out.stdout
    out = run_cli(tmp_path, "node", "start", "--help")
    assert out.returncode == 0
    for option in ("--host", "--port", "--data-dir", "--upstream", "--disk-space"):
        assert option in out.stdout
    assert run_cli(tmp_path, "--version").stdout.startswith("pyrsia ")


def test_node_start_invalid_disk_space(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "node", "start", "-p", str(free_port()), "--data-dir",
                  str(tmp_path / "data"), "--no-upstream", "--disk-space", "ten", timeout=30)
    assert out.returncode != 0
    assert "invalid size 'ten'" in out.stderr
    no_traceback(out.stderr)


def test_node_start_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_cli(tmp_path, "node", "start", "-p", str(port), "--data-dir",
                      str(tmp_path / "data"), "--no-upstream", timeout=30)
    assert out.returncode != 0
    assert f"127.0.0.1:{port}" in out.stderr and "in use" in out.stderr
    no_traceback(out.stderr)


@pytest.mark.parametrize(("option", "message"), [
    ("nonsense", "expected NAME.KEY=VALUE"),
    ("quic.max_datagram_size=100", "max_datagram_size must be 1200..65000"),
])
def test_node_start_bad_transport_option(tmp_path: Path, option: str, message: str) -> None:
    out = run_cli(tmp_path, "node", "start", "-p", str(free_port()), "--data-dir",
                  str(tmp_path / "data"), "--no-upstream", "--transport", "http,quic",
                  "--transport-option", option, timeout=30)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    no_traceback(out.stderr)
