"""The node's log answers "where did this come from", as text or JSON lines, on stderr or in
a file (real node processes, real clients)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.clients import skopeo
from support.fixtures import SeededUpstream
from support.node import NodeProcess, node_status, wait_until

pytestmark = pytest.mark.process
IMAGE = "library/alpine:3.16.2"


def _copy(node: NodeProcess, dest: Path) -> None:
    skopeo("copy", "--src-tls-verify=false", f"docker://127.0.0.1:{node.port}/{IMAGE}",
           f"dir:{dest}")


def _json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_log_file_names_image_and_source_of_every_artifact(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    upstream = fresh_seeded_upstream
    info = upstream.images[IMAGE]
    a_log, b_log = tmp_path / "a.jsonl", tmp_path / "b.log"
    a_log.write_text("")  # appended to, not truncated
    with NodeProcess(tmp_path / "a", upstream=upstream.url,
                     extra=("--log-format", "json", "--log-file", str(a_log),
                            "--sync-interval", "0.5")) as a:
        _copy(a, tmp_path / "via-a")
        lines = _json_lines(a_log)
        assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
        assert all(x["time"].endswith("Z") for x in lines)
        messages = [x["message"] for x in lines]
        assert f"Fetching manifest for {IMAGE}" in messages
        served = [x for x in lines if x.get("artifact") == "manifest"]
        assert served and served[0]["image"] == IMAGE
        assert served[0]["digest"] == info.manifest_digest
        assert "new build" in served[0]["source"]
        blobs = {x["digest"]: x for x in lines if x.get("artifact") == "blob"}
        assert set(blobs) == {info.config_digest, *info.layer_digests}
        assert {x["image"] for x in blobs.values()} == {"library/alpine"}
        assert {x["source"] for x in blobs.values()} == {"served from cache"}
        # stderr (the process output) stays quiet: everything went to the file.
        assert a.log() == ""
        a_id = node_status(a)["node_id"]
        # skopeo may be done before the build commits (it never waits for the commit).
        wait_until("A committed the build", lambda: node_status(a)["ledger_height"] >= 1)

        with NodeProcess(tmp_path / "b", extra=("--peer", a.url, "--sync-interval", "0.5",
                                                "--log-file", str(b_log))) as b:
            wait_until("B has A's records",
                       lambda: node_status(b)["ledger_height"] == node_status(a)["ledger_height"])
            mark = upstream.registry.mark()
            _copy(b, tmp_path / "via-b")
            _copy(b, tmp_path / "via-b-again")
            assert upstream.registry.requests_since(mark) == []
            text = b_log.read_text()
            assert b.log() == ""
        for digest in (info.config_digest, *info.layer_digests):
            pulled = [line for line in text.splitlines()
                      if f"Blob {digest} of library/alpine pulled from peer {a_id}" in line]
            assert len(pulled) == 1, text
            assert f"Blob {digest} of library/alpine served from cache" in text
        assert f"Fetching manifest for {IMAGE}" in text
        assert f"of {IMAGE} pulled from peer {a_id}, verified" in text  # the manifest itself
    before = a_log.read_text()
    with NodeProcess(tmp_path / "a", upstream=upstream.url,
                     extra=("--log-format", "json", "--log-file", str(a_log))):
        pass
    after = a_log.read_text()
    assert after.startswith(before) and len(after) > len(before)  # appended


def test_start_errors_still_reach_stderr_with_a_log_file(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "pyrsia_cli", "node", "start", "-p", str(port),
             "--no-upstream", "--data-dir", str(tmp_path / "d"),
             "--log-file", str(tmp_path / "n.log")],
            capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "cannot listen on" in proc.stderr and "Traceback" not in proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "pyrsia_cli", "node", "start", "-p", "0", "--no-upstream",
         "--data-dir", str(tmp_path / "d"), "--log-file", str(tmp_path / "no" / "dir.log")],
        capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.startswith("Error: cannot open the log file") and "Traceback" not in (
        bad.stderr)


def test_a_large_blob_fetched_in_parts_names_the_peers_it_came_from(tmp_path: Path) -> None:
    # 9 MiB: logged with a part list, so a peer fetch goes through the swarm (in parts).
    import httpx
    from support.images import make_image_layout, push
    from support.registry import UpstreamRegistry

    with UpstreamRegistry(tmp_path / "up") as reg:
        layout = make_image_layout(tmp_path / "layout", seed="parts-log", layers=1,
                                   layer_size=9 * 1024 * 1024, tag="1.0")
        push(layout, reg, "library/large", "1.0", format="v2s2", src_tag="1.0")
        layer = httpx.get(f"{reg.url}/v2/library/large/manifests/1.0", headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json"}).json()["layers"][0]
        with NodeProcess(tmp_path / "a", upstream=reg.url,
                         extra=("--sync-interval", "0.5")) as a:
            before = node_status(a)["ledger_height"]
            assert httpx.get(f"{a.url}/v2/library/large/manifests/1.0", timeout=60).is_success
            a_id = node_status(a)["node_id"]
            # The manifest is answered before the build commits: B must sync its block.
            wait_until("A committed the build", lambda: node_status(a)["ledger_height"] > before)
            with NodeProcess(tmp_path / "b", extra=("--peer", a.url, "--sync-interval", "0.5",
                                                    "--log-format", "json")) as b:
                wait_until("B synced", lambda: node_status(b)["ledger_height"]
                           == node_status(a)["ledger_height"])
                resp = httpx.get(f"{b.url}/v2/library/large/blobs/{layer['digest']}",
                                 timeout=120)
                assert resp.status_code == 200 and len(resp.content) == layer["size"]
                lines = [json.loads(x) for x in b.log().splitlines()]
    served = [x for x in lines if x.get("artifact") == "blob"
              and x.get("digest") == layer["digest"]]
    assert len(served) == 1
    assert served[0]["image"] == "library/large"
    assert served[0]["source"] == f"pulled from peer {a_id}, verified"
