"""The CLI a person expects: --version, shell completion, tables, a progress line."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
from support.clients import skopeo
from support.fixtures import SeededUpstream
from support.node import NodeProcess, cli_env, run_cli


def test_version_names_every_installed_pyrsia_distribution(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "--version")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0] == "pyrsia 0.1.0"
    names = {line.split()[0] for line in lines[1:]}
    assert {"pyrsia-cli", "pyrsia-core", "pyrsia-registry", "pyrsia-storage-fs",
            "pyrsia-transport-http"} <= names
    assert all(len(line.split()) == 2 for line in lines[1:])


def _complete(script: Path, *words: str) -> list[str]:
    """What bash completes for ``pyrsia WORDS`` (the last word is the one being typed)."""
    argv = ["pyrsia", *words]
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in argv)
    prog = (f"source {script}\nCOMP_WORDS=({quoted})\nCOMP_CWORD={len(argv) - 1}\n"
            "_pyrsia_complete\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
            "complete -p pyrsia\n")
    out = subprocess.run(["bash", "--norc", "-c", prog], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[-1] == "complete -o default -F _pyrsia_complete pyrsia"
    return [w for w in lines[:-1] if w]


def test_bash_completion_is_valid_and_completes_from_the_parser(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "completion", "bash")
    assert out.returncode == 0, out.stderr
    script = tmp_path / "pyrsia.bash"
    script.write_text(out.stdout)
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    top = _complete(script, "")
    assert {"node", "config", "status", "list", "verify", "setup", "completion"} <= set(top)
    assert _complete(script, "se") == ["setup"]
    assert _complete(script, "setup", "") == ["docker", "podman", "containerd", "service"]
    assert _complete(script, "node", "start", "--log-f") == ["--log-format", "--log-file"]
    assert _complete(script, "node", "start", "--log-format", "") == ["text", "json"]
    assert _complete(script, "-p", "7", "node", "start", "--log-level", "w") == ["warning"]
    assert _complete(script, "inspect-log", "") == ["docker", "maven"]
    assert "--dry-run" in _complete(script, "setup", "docker", "--")
    # A value without choices (a path): nothing from us, bash completes file names.
    assert _complete(script, "setup", "docker", "--file", "") == []
    # Hidden options stay hidden.
    assert "--sync-interval" not in _complete(script, "node", "start", "--")
    assert run_cli(tmp_path, "completion", "fish").returncode == 2


def test_zsh_completion_loads_through_bashcompinit(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "completion", "zsh")
    assert out.returncode == 0, out.stderr
    script = tmp_path / "pyrsia.zsh"
    script.write_text(out.stdout)
    assert subprocess.run(["zsh", "-n", str(script)], timeout=30).returncode == 0
    prog = (f"source {script}\nprint -r -- \"$_comps[pyrsia]\"\n"
            "COMP_WORDS=(pyrsia setup ''); COMP_CWORD=2; _pyrsia_complete\n"
            "print -r -- \"${COMPREPLY[@]}\"\n"
            # (zsh's compgen leaves the prefix filtering to compadd: ask with none)
            "COMP_WORDS=(pyrsia node start --log-format ''); COMP_CWORD=4; _pyrsia_complete\n"
            "print -r -- \"${COMPREPLY[@]}\"\n")
    home = tmp_path / "zhome"
    home.mkdir()
    run = subprocess.run(["zsh", "-f", "-c", prog], capture_output=True, text=True, timeout=60,
                         env={"HOME": str(home), "PATH": os.environ["PATH"]}, cwd=home)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.splitlines() == ["_bash_complete -o default -F _pyrsia_complete",
                                       "docker podman containerd service", "text json"]


def test_format_table_aligns_columns() -> None:
    from pyrsia_cli._terminal import format_table

    text = format_table(["A", "LONG HEADER", "C"], [["xxxx", "y", "z"], ["1", "22", "333"]])
    assert text.splitlines() == ["A     LONG HEADER  C", "xxxx  y            z",
                                 "1     22           333"]


@pytest.mark.process
def test_verify_shows_progress_only_on_a_terminal(
    tmp_path: Path, seeded_upstream: SeededUpstream
) -> None:
    with NodeProcess(tmp_path / "n", upstream=seeded_upstream.url) as node:
        skopeo("copy", "--src-tls-verify=false",
               f"docker://127.0.0.1:{node.port}/library/alpine:3.16.2", f"dir:{tmp_path / 'x'}")
        node.get("/api/status")  # the build is committed
    args = ["verify", "docker", "--image", "alpine:3.16.2", "--data-dir", str(node.data_dir)]
    plain = run_cli(tmp_path, *args)
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr == ""  # not a terminal: no progress line
    # stderr on a pseudo-terminal: the progress line is drawn there, then erased.
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pyrsia_cli", *args],
                                stdout=subprocess.PIPE, stderr=follower,
                                env=cli_env(tmp_path))
        os.close(follower)
        seen = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            if not ready:
                break
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            seen += data
        stdout = proc.communicate(timeout=60)[0].decode()
    finally:
        os.close(leader)
    assert proc.returncode == 0
    text = seen.decode()
    assert "verifying alpine:3.16.2: artifacts" in text and "(100%)" in text
    assert text.endswith("\r\x1b[K")  # erased before the result is printed
    assert stdout == plain.stdout and "OK: " in stdout
