"""Where a streamed blob came from is reported once it is served.

A blob that a regular node fetches from a peer while a client waits is reported as coming
from that peer -- in the node's log line for the response, on the status page
(``/api/activity``) and in ``/metrics`` -- not as ``served from cache``.

The peer fetch runs in the node's task group (``PluginHost._from_peers``), shared by
every request for the blob: the source travels with the blob in flight
(``VerifiedBlob.origin``) and is noted in each request once its bytes are sent; a blob
in flight that never streamed is not logged as served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.hostile import Handler, HostileUpstream
from support.images import OCI_MANIFEST, build_image
from support.node import NodeProcess, node_status, wait_until

pytestmark = pytest.mark.process


@pytest.fixture
def upstream() -> Iterator[HostileUpstream]:
    with HostileUpstream() as up:
        yield up


def test_a_blob_streamed_from_a_peer_is_reported_as_from_that_peer(
    tmp_path: Path, upstream: HostileUpstream
) -> None:
    built = build_image(seed="streaming:provenance", layer_size=3 << 20)  # no part list
    (layer,) = built.layer_digests
    upstream.manifest("peer/prov", "1", built.manifest, OCI_MANIFEST)
    for digest in (built.config_digest, layer):
        upstream.blob("peer/prov", built.blobs[digest])
    fast = ("--sync-interval", "0.5")
    with NodeProcess(tmp_path / "a", upstream=upstream.url, extra=fast) as a:
        assert a.get("/v2/peer/prov/manifests/1").status_code == 200
        assert a.get(f"/v2/peer/prov/blobs/{layer}").status_code == 200
        a_id = node_status(a)["node_id"]
        with NodeProcess(tmp_path / "b", extra=(*fast, "--peer", a.url)) as b:
            wait_until("B synced", lambda: node_status(b)["ledger_head"]
                       == node_status(a)["ledger_head"])
            resp = b.get(f"/v2/peer/prov/blobs/{layer}")
            assert resp.status_code == 200 and resp.content == built.blobs[layer]
            wait_until("B to log its fetch from A",  # B did fetch it from A
                       lambda: f"Blob {layer} pulled from peer" in b.log(), timeout=10)
            served = [line for line in b.log().splitlines()
                      if line.split(" > ", 1)[-1].startswith(f"Blob {layer} of peer/prov")]
            assert len(served) == 1, served
            assert f"pulled from peer {a_id}, verified" in served[0], served[0]
            pulls = [p for p in b.get("/api/activity").json()["pulls"]
                     if p["path"].endswith(layer)]
            assert [p["source"] for p in pulls] == ["peer"], pulls
            metrics = httpx.get(f"{b.url}/metrics", timeout=30).text
            assert 'pyrsia_served_bytes_total{source="peer"}' in metrics


def test_a_blob_that_never_streamed_is_not_logged_as_served(
    tmp_path: Path, upstream: HostileUpstream
) -> None:
    """The upstream closes the connection after 512 KiB of a 6 MiB layer: the client waiting
    on it gets 404 BLOB_UNKNOWN, and the node's log does not also say that the blob was
    ``served from cache (6293718 bytes)``."""
    built = build_image(seed="streaming:never", layer_size=6 << 20)
    (layer,) = built.layer_digests
    data = built.blobs[layer]
    upstream.manifest("evil/never", "1", built.manifest, OCI_MANIFEST)
    upstream.blob("evil/never", built.blobs[built.config_digest])
    paused = threading.Event()

    def drop(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[: 512 << 10])
        h.wfile.flush()
        paused.set()
        upstream.sleep(1.0)
        h.close_connection = True

    upstream.route(f"/v2/evil/never/blobs/{layer}", drop)
    with NodeProcess(tmp_path / "a", upstream=upstream.url) as a:
        assert a.get("/v2/evil/never/manifests/1").status_code == 200
        assert paused.wait(30)
        resp = a.get(f"/v2/evil/never/blobs/{layer}")
        assert resp.status_code == 404, resp.text
        time.sleep(0.5)
        served = [line for line in a.log().splitlines()
                  if f"Blob {layer} of evil/never served" in line]
        assert served == [], served
