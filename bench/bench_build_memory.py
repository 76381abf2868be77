"""Memory of a node building a 1 GiB layer through the package-type contract.

    python bench/bench_build_memory.py [--mib 1024]

A one-layer image whose layer is ``--mib`` MiB (random bytes, in a file) is served by a
minimal OCI registry on 127.0.0.1 (this script, streaming from disk); a fresh node
(``pyrsia node start``, the Docker plugin) builds it (``POST /api/build/docker``:
manifests, config and the layer stream through the plugin's ArtifactSink into the
blob store, verified as they arrive; then the part list
of the layer is computed and everything is committed). The node's resident memory is
sampled every 20 ms from ``/proc/<pid>/status`` while it builds; its high-water mark
(``VmHWM``) is read at the end. Reported: idle RSS (started, before the build), peak
RSS, and peak over idle. Goal: a small constant, independent of the layer's size
(the layer is never held in memory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.net import free_port
from support.node import NodeProcess

MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def _write_layer(path: Path, mib: int) -> str:
    """``mib`` MiB of seeded random bytes; their sha256 digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(mib):
            chunk = random.Random(i).randbytes(1 << 20)
            h.update(chunk)
            f.write(chunk)
    return "sha256:" + h.hexdigest()


def _registry(layer: Path, layer_digest: str) -> tuple[ThreadingHTTPServer, str]:
    """A pull-only registry of one image, ``library/big:1.0``, on a free port."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": len(config), "digest": config_digest},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar",
                    "size": layer.stat().st_size, "digest": layer_digest}],
    }).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path.endswith("/manifests/1.0") or path.endswith(
                    "/manifests/sha256:" + hashlib.sha256(manifest).hexdigest()):
                self._send(manifest, MANIFEST)
            elif path.endswith("/blobs/" + config_digest):
                self._send(config, "application/octet-stream")
            elif path.endswith("/blobs/" + layer_digest):
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(layer.stat().st_size))
                self.end_headers()
                with open(layer, "rb") as f:
                    shutil.copyfileobj(f, self.wfile, 1 << 20)
            elif path in ("/v2", "/v2/"):
                self._send(b"{}", "application/json")
            else:
                self.send_error(404)

        def _send(self, body: bytes, ctype: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}"


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-mem-"))
    try:
        layer = work / "layer"
        digest = _write_layer(layer, args.mib)
        server, url = _registry(layer, digest)
        try:
            with NodeProcess(work / "node", upstream=url) as node, \
                    httpx.Client(base_url=node.url, timeout=60) as client:
                assert node.proc is not None
                pid = node.proc.pid
                time.sleep(2.0)  # settle after start
                idle = _kib(pid, "VmRSS")
                samples: list[int] = []
                stop = threading.Event()

                def sample() -> None:
                    while not stop.is_set():
                        samples.append(_kib(pid, "VmRSS"))
                        time.sleep(0.02)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                t0 = time.perf_counter()
                resp = client.post("/api/build/docker", json={"image": "library/big:1.0"})
                resp.raise_for_status()
                build_id = resp.json()["build_id"]
                while True:
                    status = client.get(f"/api/builds/{build_id}").json()
                    if status["status"] in ("SUCCESS", "FAILED"):
                        break
                    time.sleep(0.2)
                elapsed = time.perf_counter() - t0
                stop.set()
                sampler.join()
                hwm = _kib(pid, "VmHWM")
                if status["status"] != "SUCCESS":
                    raise SystemExit(f"build failed: {status}")
                peak = max(max(samples), hwm)
                print(f"layer: {args.mib} MiB; build took {elapsed:.1f} s "
                      f"({args.mib / elapsed:.0f} MiB/s), {status['records']} records")
                print(f"node RSS idle {idle / 1024:7.1f} MiB")
                print(f"node RSS peak {peak / 1024:7.1f} MiB (sampled max "
                      f"{max(samples) / 1024:.1f} MiB, VmHWM {hwm / 1024:.1f} MiB)")
                print(f"peak over idle {(peak - idle) / 1024:6.1f} MiB")
                print(f"build_peak_over_idle_mib={(peak - idle) / 1024:.1f}")
        finally:
            server.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
