"""The library examples run as users run them: embedding, a three-node network, a plugin."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from pyrsia_core.interfaces import PackageType
from pyrsia_core.testing.conformance import PackageTypeConformance
from support.clients import skopeo
from support.fixtures import SeededUpstream
from support.net import free_port, wait_for_http
from support.plugins import installed

from pyrsia_core import Digest, plugins

pytestmark = pytest.mark.process
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HELLO_DIST = EXAMPLES / "plugin" / "pyrsia-pkg-hello"
HELLO_TYPE = "application/vnd.pyrsia.hello.v1+json"


# --------------------------------------------------------------------------- (2) Starlette


def test_embed_in_starlette(tmp_path: Path, seeded_upstream: SeededUpstream) -> None:
    for module in ("starlette", "uvicorn"):
        assert importlib.util.find_spec(module), f"the test environment needs {module} installed"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "embed_in_starlette.py"), "--port", str(port),
         "--upstream", seeded_upstream.url, "--data-dir", str(tmp_path / "data")],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        # The host app's own route answers, with the node started in its lifespan.
        assert wait_for_http(f"{url}/health", timeout=30, process=proc).text == "ok"
        assert httpx.get(f"{url}/hello", trust_env=False).json()["pyrsia"] == "/v2/"
        # pyrsia's OCI API is served at /v2/ by the same server.
        assert httpx.get(f"{url}/v2/", trust_env=False).status_code == 200
        skopeo("copy", "--src-tls-verify=false",
               f"docker://127.0.0.1:{port}/library/alpine:3.16.2", f"dir:{tmp_path / 'img'}")
        info = seeded_upstream["library/alpine:3.16.2"]
        names = {p.name for p in (tmp_path / "img").iterdir()}
        for digest in info.artifact_digests:
            if digest.startswith("sha256:") and digest[7:] in names:
                break
        else:
            pytest.fail(f"no artifact of the image in {sorted(names)}")
        # ... and its node API, and the host routes still work after the pull.
        assert httpx.get(f"{url}/api/status", trust_env=False).json()["ledger_height"] >= 1
        assert httpx.get(f"{url}/health", trust_env=False).text == "ok"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "server.log").read_text(errors="replace")


# --------------------------------------------------------------------------- (3) three nodes


def test_three_nodes(seeded_upstream: SeededUpstream) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "three_nodes.py"), "--upstream", seeded_upstream.url,
         "--image", "library/alpine:3.16.2"],
        capture_output=True, text=True, timeout=90,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("node ") >= 3
    assert "node 3's ledger has the" in out.stdout
    assert "through node 3 (from a peer): bytes match" in out.stdout
    assert out.stdout.rstrip().endswith("OK: three nodes share the ledger and the artifacts")
    missing = subprocess.run(
        [sys.executable, str(EXAMPLES / "three_nodes.py"), "--upstream", seeded_upstream.url,
         "--image", "library/nope:1"],
        capture_output=True, text=True, timeout=90,
    )
    assert missing.returncode == 1 and "FAILED" in missing.stderr, missing.stderr[-4000:]


# --------------------------------------------------------------------------- (4) plugin


@pytest.fixture(scope="module")
def hello_installed() -> Iterator[None]:
    """The example plugin's distribution, installed for this module."""
    with installed(HELLO_DIST, "pyrsia-pkg-hello", "pyrsia_pkg_hello", "hello"):
        yield


def _hello_manifest(*files: bytes) -> bytes:
    entries = ",".join(
        f'{{"digest": "{Digest.of(f)}", "mediaType": "text/plain"}}' for f in files
    )
    return (f'{{"schemaVersion": 1, "name": "greeting", "version": "1.0", '
            f'"files": [{entries}]}}').encode()


@pytest.mark.anyio
async def test_plugin_is_picked_up_by_a_node(hello_installed: None, tmp_path: Path) -> None:
    from pyrsia_registry import NodeConfig, start_node

    spec = plugins.available("pyrsia.package_type")["hello"]
    assert spec.dist == "pyrsia-pkg-hello 0.1.0"
    config = NodeConfig(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "node",
                        upstream=None)
    async with start_node(config) as running:
        hello = running.node.package_types["hello"]
        assert isinstance(hello, PackageType)
        assert (hello.name, hello.record_type) == ("hello", "Hello")
        assert "docker" in running.node.package_types  # the built-in one is still there
        assert hello.parse_package_id("Greeting:1.0") == "greeting:1.0"
        async with httpx.AsyncClient(trust_env=False) as client:
            assert (await client.get(f"{running.url}/health")).status_code == 404
            assert (await client.get(f"{running.url}/v2/")).status_code == 200


class TestHelloConformance(PackageTypeConformance):
    @pytest.fixture
    def package_type(self, hello_installed: None) -> PackageType:
        created: PackageType = plugins.create("pyrsia.package_type", "hello")
        return created

    @pytest.fixture
    def valid_ids(self) -> Sequence[str]:
        return ["greeting:1.0", "Greeting:1.0", "my-lib:2.0.1+build.5", " spaced:1 "]

    @pytest.fixture
    def invalid_ids(self) -> Sequence[str]:
        return ["", "greeting", "greeting:", ":1.0", "a b:1", "x:1:2", "x" * 300 + ":1"]

    @pytest.fixture
    def samples(self) -> Sequence[tuple[bytes, str, Sequence[Digest | str]]]:
        a, b = b"hello, world\n", b"bonjour\n"
        return [
            (_hello_manifest(a, b), HELLO_TYPE, [Digest.of(a), Digest.of(b)]),
            (_hello_manifest(), HELLO_TYPE, []),
        ]
