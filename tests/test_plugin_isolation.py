"""A package-type plugin that raises, hangs or returns garbage fails alone.

The test-only distribution ``tests/plugins/pyrsia-pkg-bad`` is installed (entry point
``bad``) and picked up by a node started in-process on 127.0.0.1; real HTTP requests
reach its routes, its builds, and -- meanwhile -- Docker's and Maven's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from support.maven import maven_upstream, write_gav
from support.net import free_port
from support.plugins import installed

from pyrsia_core import plugins

pytestmark = pytest.mark.process
BAD_DIST = Path(__file__).resolve().parent / "plugins" / "pyrsia-pkg-bad"
LABEL = "bad (pyrsia-pkg-bad 0.1.0)"
TIMEOUT = 1.5


@pytest.fixture(scope="module")
def bad_installed() -> Iterator[None]:
    with installed(BAD_DIST, "pyrsia-pkg-bad", "pyrsia_pkg_bad", "bad"):
        yield


def _plugin_error(resp: httpx.Response) -> str:
    assert resp.status_code == 502, (resp.status_code, resp.text)
    error = resp.json()["errors"][0]
    assert error["code"] == "PLUGIN_FAILED"
    assert error["detail"]["plugin"] == LABEL
    assert LABEL in error["message"]
    return str(error["message"])


@pytest.mark.anyio
async def test_bad_plugin_fails_alone(bad_installed: None, tmp_path: Path) -> None:
    from pyrsia_registry import NodeConfig, start_node

    assert plugins.available("pyrsia.package_type")["bad"].dist == "pyrsia-pkg-bad 0.1.0"
    files = write_gav(tmp_path / "m2", "com.example", "hello", "1.0")
    jar = "com/example/hello/1.0/hello-1.0.jar"
    with maven_upstream(tmp_path / "m2") as upstream:
        config = NodeConfig(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "node",
                            upstream=None, plugin_timeout=TIMEOUT,
                            package_options={"maven": {"upstream": upstream.url}})
        async with start_node(config) as running, httpx.AsyncClient(
            base_url=running.url, trust_env=False, timeout=30
        ) as client:
            assert "bad" in running.node.package_types
            assert (await client.get("/bad/ok")).text == "fine"

            # A hanging request is cut off after the timeout; meanwhile the node serves
            # Docker's and Maven's clients without waiting for it.
            results: dict[str, Any] = {}

            async def hang() -> None:
                start = time.monotonic()
                results["hang"] = await client.get("/bad/hang")
                results["hang_s"] = time.monotonic() - start

            async with anyio.create_task_group() as tg:
                tg.start_soon(hang)
                await anyio.sleep(0.2)
                start = time.monotonic()
                assert (await client.get("/v2/")).status_code == 200
                maven = await client.get(f"/maven2/{jar}")
                assert maven.status_code == 200 and maven.content == files[jar]
                assert time.monotonic() - start < TIMEOUT
                assert "hang" not in results  # still hanging while the others were served
            assert "within 1.5 s" in _plugin_error(results["hang"])
            assert TIMEOUT <= results["hang_s"] < TIMEOUT + 5

            assert "RuntimeError" in _plugin_error(await client.get("/bad/raise"))
            assert "http.response.start" in _plugin_error(await client.get("/bad/garbage"))
            assert "str" in _plugin_error(await client.get("/bad/notdict"))
            _plugin_error(await client.get("/bad/badheaders"))
            assert "without completing" in _plugin_error(await client.get("/bad/nothing"))
            head = await client.head("/bad/raise")
            assert head.status_code == 502 and head.content == b""
            # A response broken off after its headers: the connection is closed, so the
            # client never takes the 10 bytes for the whole body.
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/bad/half")

            # Builds: garbage, a wrong digest, an exception and a hang all fail, naming
            # the plugin; nothing is logged.
            for package_id, why in [("garbage:1", "not a BuiltArtifact"),
                                    ("wrongdigest:1", "does not hash"),
                                    ("raise:1", "ZeroDivisionError"),
                                    ("hang:1", "did not finish within 1.5 s")]:
                resp = await client.post("/api/build/bad", json={"id": package_id})
                assert resp.status_code == 202, resp.text
                build_id = resp.json()["build_id"]
                status: dict[str, Any] = {}
                with anyio.fail_after(TIMEOUT + 10):
                    while status.get("status", "RUNNING") == "RUNNING":
                        await anyio.sleep(0.05)
                        status = (await client.get(f"/api/builds/{build_id}")).json()
                assert status["status"] == "FAILED", status
                assert LABEL in status["reason"] and why in status["reason"], status
                assert not await running.node.records_for_package("Bad", package_id)
            crash = await client.post("/api/build/bad", json={"id": "crash:1"})
            assert crash.status_code == 500 and LABEL in crash.json()["error"]
            invalid = await client.post("/api/build/bad", json={"id": "???"})
            assert invalid.status_code == 400
            ok = await client.post("/api/build/bad", json={"id": "ok:1"})
            assert ok.status_code == 202
            # After all that the node is up and every other package type still works.
            assert (await client.get("/api/status")).status_code == 200
            assert (await client.get(f"/maven2/{jar}.sha1")).status_code == 200
            assert (await client.get("/v2/")).status_code == 200
            log = await client.get("/api/inspect-log/bad", params={"id": "ok:1"})
            assert log.status_code == 200 and log.json()[0]["package_type"] == "Bad"


@pytest.mark.anyio
async def test_node_starts_when_a_plugin_factory_raises(
    bad_installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyrsia_pkg_bad import BadPackageType

    from pyrsia_registry import NodeConfig, start_node

    def explode(config: Any) -> Any:
        raise RuntimeError("factory exploded")

    monkeypatch.setattr(BadPackageType, "from_config", explode)
    config = NodeConfig(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "node",
                        upstream=None)
    async with start_node(config) as running, httpx.AsyncClient(
        base_url=running.url, trust_env=False
    ) as client:
        assert "bad" not in running.node.package_types
        assert "maven" in running.node.package_types
        assert (await client.get("/bad/ok")).status_code == 404
        assert (await client.get("/v2/")).status_code == 200
