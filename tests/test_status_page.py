"""The node's web status page, in a real headless browser (Chromium + selenium): it shows
a pull and where it came from, updates itself when the next pull happens (no reload), logs
no console error, fits a phone's width, and never holds the admin token."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from pyrsia_registry._statuspage import status_page
from support.browser import artifacts_dir, chromium, console_errors, phone_width
from support.fixtures import SeededUpstream
from support.node import NodeProcess, node_status, wait_until
from support.pulls import pull

pytestmark = pytest.mark.process
IMAGE = "library/alpine:3.16.2"
REPO = IMAGE.split(":")[0]


def rows(driver: Any, table: str, *, titles: bool = False) -> list[list[str]]:
    """The text of each cell of ``table``'s body rows (with ``titles``: a cell's title,
    the full text of what it shows shortened, where it has one)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr'))"
        ".map(tr => Array.from(tr.cells).map(td => (arguments[1] && td.title) || "
        "td.textContent));", table, titles)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def pulls_of(driver: Any, what: str) -> list[list[str]]:
    """Rows of the pulls table whose path contains ``what`` (newest first)."""
    return [r for r in rows(driver, "pulls", titles=True) if what in r[1]]


def screenshot(driver: Any, name: str) -> Path:
    path = artifacts_dir() / name
    assert driver.save_screenshot(str(path)), path
    assert path.stat().st_size > 1000
    return path


def no_horizontal_scroll(driver: Any) -> None:
    width, scroll = driver.execute_script(
        "return [window.innerWidth, document.documentElement.scrollWidth];")
    assert scroll <= width, f"the page is {scroll} px wide in a {width} px window"


def test_status_page_shows_pulls_live_in_a_browser(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    upstream = fresh_seeded_upstream
    info = upstream.images[IMAGE]
    manifest_path = f"/v2/{REPO}/manifests/3.16.2"
    with NodeProcess(tmp_path / "a", upstream=upstream.url) as node, chromium() as driver:
        token = (node.data_dir / "admin.token").read_text().strip()
        status = node_status(node)
        pull(node.url, upstream, IMAGE)

        driver.get(node.url + "/")
        assert driver.title == "pyrsia node"
        first = wait_for("the pull on the page", lambda: pulls_of(driver, manifest_path))
        assert len(first) == 1 and first[0][4] == "build", first
        for digest in (info.config_digest, *info.layer_digests):
            blob = pulls_of(driver, digest)
            assert len(blob) == 1 and blob[0][4] == "cache", blob
        body = driver.find_element("tag name", "body").text
        assert status["node_id"][:16] in body
        assert "build node" in body
        assert status["network_origin"] in body
        wait_for("the ledger height", lambda: "Height\n1" in driver.find_element(
            "id", "ledger").text)
        screenshot(driver, "status-page-desktop.png")

        # The second pull appears without a reload (the marker survives), from the cache.
        driver.execute_script("window.pyrsiaMarker = 42;")
        pull(node.url, upstream, IMAGE)
        both = wait_for("the second pull", lambda: len(pulls_of(driver, manifest_path)) == 2
                        and pulls_of(driver, manifest_path))
        assert both[0][4] == "cache" and both[1][4] == "build", both
        assert driver.execute_script("return window.pyrsiaMarker;") == 42
        assert float(both[0][5].split()[0]) >= 0
        screenshot(driver, "status-page-updated.png")

        # A stored copy damaged on disk, reported by a client: the failure appears, live.
        layer = info.layer_digests[0]
        stored = node.data_dir / "blobs" / "sha256" / layer[7:9] / layer[7:]
        data = bytearray(stored.read_bytes())
        data[0] ^= 0xFF
        stored.write_bytes(bytes(data))
        resp = httpx.post(node.url + "/api/cache/verify", json={"digest": layer}, timeout=10)
        assert resp.json()["stored"] is False, resp.text
        failures = wait_for("the damaged copy on the page",
                            lambda: len(rows(driver, "failures")) == 2
                            and rows(driver, "failures", titles=True))
        assert [f[1] for f in failures] == ["stored_copy_damaged", "reported_mismatch"]
        assert failures[0][2] == "this node's store" and layer in failures[0][3], failures
        driver.execute_script("document.getElementById('failures').scrollIntoView();")
        screenshot(driver, "status-page-failure.png")

        phone_width(driver)
        time.sleep(1.5)  # a refresh at the new width
        no_horizontal_scroll(driver)
        screenshot(driver, "status-page-phone.png")
        assert console_errors(driver) == []

        # No secret on the page or in what it reads; nothing on it changes state.
        for path in ("/", "/ui/status.js", "/ui/status.css", "/api/activity", "/api/status"):
            text = httpx.get(node.url + path, timeout=10).text
            assert token not in text, path
        assert token not in driver.page_source
        assert driver.find_elements("tag name", "form") == []
        assert driver.find_elements("tag name", "button") == []
        resp = httpx.get(node.url + "/", timeout=10)
        assert "script-src 'self'" in resp.headers["content-security-policy"]
        assert httpx.post(node.url + "/", timeout=10).status_code == 405
        # A page elsewhere (DNS rebinding) cannot read the activity: the node API's Host rule.
        rebound = httpx.get(node.url + "/api/activity", headers={"host": "evil.example"},
                            timeout=10)
        assert rebound.status_code == 421 and "pulls" not in rebound.text


def test_status_page_of_a_mirror_shows_its_peer_and_a_pull_from_it(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    upstream = fresh_seeded_upstream
    info = upstream.images[IMAGE]
    with NodeProcess(tmp_path / "a", upstream=upstream.url,
                     extra=("--sync-interval", "0.5")) as a:
        pull(a.url, upstream, IMAGE)
        a_id = node_status(a)["node_id"]
        # The pull may be done before the build commits (a client never waits for it).
        wait_until("A committed the build", lambda: node_status(a)["ledger_height"] >= 1)
        with NodeProcess(tmp_path / "b", extra=("--peer", a.url, "--sync-interval", "0.5")) as b, \
                chromium() as driver:
            wait_until("B has A's records",
                       lambda: node_status(b)["ledger_height"] == node_status(a)["ledger_height"])
            driver.get(b.url + "/")
            peers = wait_for("A among B's peers", lambda: rows(driver, "peers"))
            assert peers[0][0] == a_id[:16] + "…" and peers[0][1] == a.url, peers
            assert peers[0][2] == "http" and peers[0][6] == "build node", peers
            pull(b.url, upstream, IMAGE)
            layer = info.layer_digests[0]
            got = wait_for("the layer pulled from A", lambda: pulls_of(driver, layer))
            assert got[0][4] == f"peer {a_id[:16]}…", got
            # B's page counts the bytes it got from A, live.
            wait_for("bytes in from A", lambda: rows(driver, "peers")[0][4] not in ("0 B", ""))
            assert "mirror" in driver.find_element("id", "node").text
            screenshot(driver, "status-page-mirror.png")
            assert console_errors(driver) == []
        activity = httpx.get(a.url + "/api/activity", timeout=10).json()
        assert activity["uploads"]["bytes"] > 0  # A served B's blobs


@pytest.mark.anyio
async def test_page_links_follow_the_mount_point() -> None:
    """Mounted at ``/pyrsia`` (an embedding app's root_path), the page's script, style
    and API calls stay below it."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": "/pyrsia/", "root_path": "/pyrsia",
             "headers": []}
    await status_page(None, "/", scope, receive, send)
    assert sent[0]["status"] == 200
    page = sent[1]["body"].decode()
    assert 'src="/pyrsia/ui/status.js"' in page
    assert 'href="/pyrsia/ui/status.css"' in page
    assert '<meta name="pyrsia-root" content="/pyrsia">' in page
    scope["root_path"] = '/a"><script>'
    sent.clear()
    await status_page(None, "/", scope, receive, send)
    assert '"><script>' not in sent[1]["body"].decode()


MOUNTED = '''
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from pyrsia_registry import NodeConfig, start_node

port, data = int(sys.argv[1]), Path(sys.argv[2])
node_app = {}


async def pyrsia(scope, receive, send):
    await node_app["app"](scope, receive, send)


async def home(request):
    return PlainTextResponse("the host app")


@asynccontextmanager
async def lifespan(app):
    config = NodeConfig(host="127.0.0.1", port=port, data_dir=data, upstream=None)
    async with start_node(config, serve_http=False) as running:
        node_app["app"] = running.app
        yield


app = Starlette(routes=[Route("/", home), Mount("/pyrsia", app=pyrsia)], lifespan=lifespan)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
'''


def test_status_page_mounted_below_a_host_app(tmp_path: Path) -> None:
    """The node's app mounted at ``/pyrsia`` of a Starlette app: the page loads its script
    and data from below the mount point and runs live, with no console error."""
    import subprocess
    import sys

    from support.net import free_port, wait_for_http

    script = tmp_path / "mounted.py"
    script.write_text(MOUNTED)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path / "d")],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for_http(f"{url}/", timeout=30, process=proc).text == "the host app"
        node_id = httpx.get(f"{url}/pyrsia/api/status", timeout=10).json()["node_id"]
        with chromium() as driver:
            driver.get(f"{url}/pyrsia/")
            wait_for("the page to go live", lambda: driver.find_element(
                "id", "live").text.startswith("live"))
            assert node_id[:16] in driver.find_element("id", "node").text
            assert driver.find_element("id", "pulls-empty").is_displayed()
            assert driver.find_element("id", "metrics").get_attribute(
                "href") == f"{url}/pyrsia/metrics"
            screenshot(driver, "status-page-mounted.png")
            assert console_errors(driver) == []
        assert "pyrsia_ledger_height 0.0" in httpx.get(f"{url}/pyrsia/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
