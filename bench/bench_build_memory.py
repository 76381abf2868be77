"""Memory of a node building a 1 GiB layer through the package-type contract.

    python bench/bench_build_memory.py [--mib 1024]

A one-layer image whose layer is ``--mib`` MiB is pushed to a local Debian
``docker-registry``; a fresh node (``pyrsia node start``, the Docker plugin) builds it
(``POST /api/build/docker``: manifests, config and the layer stream through the
plugin's ArtifactSink into the blob store, verified as they arrive; then the part list
of the layer is computed and everything is committed). The node's resident memory is
sampled every 20 ms from ``/proc/<pid>/status`` while it builds; its high-water mark
(``VmHWM``) is read at the end. Reported: idle RSS (started, before the build), peak
RSS, and peak over idle. Goal: a small constant, independent of the layer's size
(the layer is never held in memory).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.images import make_image_layout, push
from support.node import NodeProcess
from support.registry import UpstreamRegistry


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
        with UpstreamRegistry(work / "upstream") as reg:
            layout = make_image_layout(work / "layout", seed="mem", layers=1,
                                       layer_size=args.mib * 1024 * 1024, tag="1.0")
            push(layout, reg, "library/big", "1.0", format="v2s2", src_tag="1.0",
                 timeout=1200)
            shutil.rmtree(work / "layout")
            with NodeProcess(work / "node", upstream=reg.url) as node, \
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
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
