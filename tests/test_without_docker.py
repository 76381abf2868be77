"""A node whose environment lacks the Docker plugin's distribution (pyrsia-pkg-docker).

The node knows no package type by name: with only Maven installed it serves Maven, its
API lists Maven alone, and ``/v2/`` answers a clear OCI error naming the missing
distribution -- no traceback, no crash. The environment is a real virtual environment:
every installed distribution of this one, except pyrsia-pkg-docker.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.maven import maven_upstream, write_gav
from support.node import NodeProcess

pytestmark = pytest.mark.process

_DOCKER = ("pyrsia_pkg_docker", "_editable_impl_pyrsia_pkg_docker",
           "__editable___pyrsia_pkg_docker")


@pytest.fixture(scope="module")
def python_without_docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The interpreter of a venv holding this environment's packages but the Docker plugin."""
    root = tmp_path_factory.mktemp("nodocker") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)
    python = str(root / "bin" / "python")
    here = Path(sysconfig.get_paths()["purelib"])
    there = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60).stdout.strip())
    for entry in here.iterdir():
        if entry.name.startswith(_DOCKER) or (there / entry.name).exists():
            continue
        (there / entry.name).symlink_to(entry)
    probe = subprocess.run(
        [python, "-c", "import importlib.util, importlib.metadata as m;"
         "print(importlib.util.find_spec('pyrsia_pkg_docker') is None,"
         " sorted(e.name for e in m.entry_points(group='pyrsia.package_type')))"],
        check=True, capture_output=True, text=True, timeout=60).stdout.split(maxsplit=1)
    assert probe[0] == "True", "the Docker plugin is still importable"
    assert "'docker'" not in probe[1] and "'maven'" in probe[1], probe
    yield python


def test_a_node_without_the_docker_plugin_serves_maven_and_says_docker_is_missing(
    tmp_path: Path, python_without_docker: str
) -> None:
    files = write_gav(tmp_path / "repo", "com.example", "hello", "1.0", sha1=True)
    with maven_upstream(tmp_path / "repo") as upstream, NodeProcess(
        tmp_path / "node", python=python_without_docker,
        extra=("--package-option", f"maven.upstream={upstream.url}"),
    ) as node, httpx.Client(base_url=node.url, timeout=30) as client:
        jar = client.get("/maven2/com/example/hello/1.0/hello-1.0.jar")
        assert jar.status_code == 200
        assert jar.content == files["com/example/hello/1.0/hello-1.0.jar"]
        sha1 = client.get("/maven2/com/example/hello/1.0/hello-1.0.jar.sha1")
        assert sha1.text == hashlib.sha1(jar.content).hexdigest()
        types = client.get("/api/package-types").json()
        assert [t["name"] for t in types] == ["maven"]
        for method in ("GET", "HEAD"):
            resp = client.request(method, "/v2/")
            assert resp.status_code == 404
        body = client.get("/v2/library/alpine/manifests/3.16.2").json()
        error = body["errors"][0]
        assert "no Docker package type is installed" in error["message"]
        assert "pyrsia-pkg-docker" in error["message"]
        assert error["detail"] == {"distribution": "pyrsia-pkg-docker"}
        unknown = client.post("/api/build/docker", json={"image": "alpine:3"})
        assert unknown.status_code == 400
        assert unknown.json()["error"] == "unknown package type 'docker' (known: maven)"
        log = node.log()
    assert "Traceback" not in log
    assert "pyrsia_pkg_docker" not in log
