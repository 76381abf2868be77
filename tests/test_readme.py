"""Every command block of the README, run as written (issue: hardening, fault 8).

The first block (install and run a node; install and run the tests) is what CI itself runs.
Every other ``sh`` block is pasted into bash, in a network namespace of its own: its
127.0.0.1 is private, so the README's fixed ports (7888, 7889) are free, and nothing leaves
it. Inside, a ``docker-registry`` on 127.0.0.1:5000 serves the test images, and
``PYRSIA_UPSTREAM`` (documented in the README) points the nodes at it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.images import ImageSpec, seed_images
from support.registry import UpstreamRegistry

pytestmark = pytest.mark.process
README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
IMAGES = (
    ImageSpec("library/alpine", "3.16.2", "v2s2", seed="alpine-3.16.2"),
    ImageSpec("library/alpine", "3.16.3", "v2s2", seed="alpine-3.16.3"),
)


def blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


@pytest.fixture(scope="module")
def registry_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A registry config serving the seeded images on 127.0.0.1:5000 (inside a namespace)."""
    base = tmp_path_factory.mktemp("readme-upstream")
    with UpstreamRegistry(base / "registry") as registry:
        seed_images(registry, IMAGES, workdir=base / "layouts")
        config = registry.config()
    config["http"]["addr"] = "127.0.0.1:5000"
    path = base / "inside.yml"
    path.write_text(json.dumps(config))
    yield path


def run_block(block: str, workdir: Path, registry_config: Path) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "block.sh"
    script.write_text(
        "set -euo pipefail\n"
        "ip link set lo up\n"
        f"docker-registry serve {registry_config} > registry.log 2>&1 &\n"
        "for _ in $(seq 100); do curl -sf http://127.0.0.1:5000/v2/ >/dev/null && break; "
        "sleep 0.1; done\n"
        # Background jobs (the README's nodes) are stopped, and waited for, at the end.
        "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n"
        "set -x\n"
        + block
    )
    home = workdir / "home"
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "PYRSIA_UPSTREAM": "http://127.0.0.1:5000",
        "LANG": "C.UTF-8",
    }
    return subprocess.run(["unshare", "--net", "bash", str(script)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_readme_starts_with_the_two_commands() -> None:
    first = blocks()[0].strip().splitlines()
    assert len(first) == 2
    assert first[0].startswith("python3 -m pip install ") and first[0].endswith(
        "&& pyrsia node start")
    ci = (README.parent / ".ci" / "run").read_text()
    assert first[1] in ci


@pytest.mark.parametrize("index", range(1, len(blocks())))
def test_readme_block_runs_as_written(index: int, tmp_path: Path, registry_config: Path) -> None:
    assert shutil.which("unshare") and shutil.which("ip")
    block = blocks()[index]
    out = run_block(block, tmp_path, registry_config)
    assert out.returncode == 0, f"README block {index} failed:\n{block}\n{out.stdout}\n" + (
        out.stderr[-6000:])
    assert "Traceback" not in out.stdout + out.stderr
    if "inspect-log docker --image alpine:3.16.2 --proof" in block:
        assert '"package_specific_artifact_id": "alpine:3.16.2"' in out.stdout
        assert '"checkpoint"' in out.stdout
        assert "OK: " in out.stdout and "alpine:3.16.2 are in the log" in out.stdout
        assert "SUCCESS" in out.stdout  # the build of 3.16.3, followed to its commit
        assert "Total disk space allocated: 20.00 GB" in out.stdout
        assert (tmp_path / "alpine" / "manifest.json").is_file()
    if "deauthorize" in block:
        assert "is now an authorized build node" in out.stdout
        assert "is no longer a build node" in out.stdout
        assert out.stdout.count("SUCCESS") >= 1
        assert "Authorized build nodes:     1" in out.stdout
    if "/readyz" in block:
        assert '"status": "ready"' in out.stdout
        assert (tmp_path / "containers" / "registries.conf.d" / "50-pyrsia.conf").is_file()
        assert '"registry-mirrors"' in out.stdout and not (tmp_path / "daemon.json").exists()
        assert json.loads((tmp_path / "node.log").read_text().splitlines()[0])["level"]
