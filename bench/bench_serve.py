"""Cache-hit blob serving: pyrsia's HTTP server vs nginx ``sendfile`` (DESIGN.md §10).

Serves one file from nginx (``sendfile on``, otherwise default settings) and from
``pyrsia_registry._server`` (a tiny ASGI app answering with ``http.response.pathsend``) in a
subprocess, downloads it with ``curl`` from 127.0.0.1 alternately, and prints MB/s of each, the
ratio of the medians, and the RSS of our server process over idle while it serves a 1 GiB file.
The last line is ``serve_ratio=<ours/nginx>``.

    python bench/bench_serve.py --size-mib 512 --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGISTRY_SRC = REPO / "pyrsia_registry" / "src"

NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp_body;
    proxy_temp_path {prefix}/tmp_proxy;
    fastcgi_temp_path {prefix}/tmp_fastcgi;
    uwsgi_temp_path {prefix}/tmp_uwsgi;
    scgi_temp_path {prefix}/tmp_scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {locations}
    }}
}}
"""

# The server under test: every file of a directory, by name, with pathsend.
SERVER_CODE = """\
import os, sys
import anyio
from pyrsia_registry._server import Server

root = sys.argv[1]

async def app(scope, receive, send):
    assert scope["type"] == "http"
    path = os.path.join(root, os.path.basename(scope["path"]))
    if not os.path.isfile(path):
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    size = os.stat(path).st_size
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(size).encode()),
    ]})
    await send({"type": "http.response.pathsend", "path": path})

async def main():
    server = Server(app, host="127.0.0.1", port=0, lifespan="off")
    async with anyio.create_task_group() as tg:
        port = await tg.start(lambda task_status: server.serve(task_status=task_status))
        print(port, flush=True)

anyio.run(main)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def write_file(path: Path, size_mib: int) -> None:
    block = os.urandom(1024 * 1024)
    with path.open("wb") as f:
        for i in range(size_mib):
            # vary each MiB a little so nothing downstream could dedupe
            f.write(i.to_bytes(8, "little") + block[8:])


def curl_speed(url: str, expected: int) -> float:
    """Download ``url`` with curl; bytes per second as curl measured it."""
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if int(float(out[1])) != expected:
        raise RuntimeError(f"{url}: got {out[1]} bytes, expected {expected}")
    return float(out[0])


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


class RssSampler(threading.Thread):
    """Samples VmRSS of a process every few milliseconds; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kib = max(self.peak_kib, proc_status(self.pid)["VmRSS"])
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def start_nginx(
    prefix: Path, root: Path, locations: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """nginx serving ``root`` on a free port (``locations``: more of its server block)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, root=root, locations=locations))
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return proc, port


def start_ours(root: Path) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REGISTRY_SRC), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_CODE, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("the pyrsia server did not start")
    port = int(line)
    wait_for_port(port)
    return proc, port


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="size of the served file")
    parser.add_argument("--runs", type=int, default=3, help="downloads per server")
    parser.add_argument("--rss-size-mib", type=int, default=1024, help="file for the RSS check")
    args = parser.parse_args()
    if not shutil.which("curl"):
        sys.exit("curl is required")

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        tmpdir = Path(tmp)
        root = tmpdir / "www"
        prefix = tmpdir / "nginx"
        root.mkdir()
        prefix.mkdir()
        # nginx workers may run as another user: let them read the files
        for path in (tmpdir, root):
            path.chmod(0o755)
        blob = root / "blob"
        write_file(blob, args.size_mib)
        size = blob.stat().st_size

        nginx, nginx_port = start_nginx(prefix, root)
        ours, our_port = start_ours(root)
        try:
            nginx_url = f"http://127.0.0.1:{nginx_port}/blob"
            our_url = f"http://127.0.0.1:{our_port}/blob"
            curl_speed(nginx_url, size)  # warm-up: page cache, connections, code paths
            curl_speed(our_url, size)
            rows: list[tuple[float, float]] = []
            for _ in range(args.runs):  # alternate, so both see the same machine state
                rows.append((curl_speed(nginx_url, size), curl_speed(our_url, size)))

            print(f"serving a {args.size_mib} MiB file from 127.0.0.1, curl, {args.runs} runs")
            print(f"{'run':>6} {'nginx MB/s':>12} {'pyrsia MB/s':>12} {'ratio':>7}")
            for i, (a, b) in enumerate(rows, 1):
                print(f"{i:>6} {a / 1e6:>12.0f} {b / 1e6:>12.0f} {b / a:>7.3f}")
            nginx_median = statistics.median(a for a, _ in rows)
            our_median = statistics.median(b for _, b in rows)
            ratio = our_median / nginx_median
            print(
                f"{'median':>6} {nginx_median / 1e6:>12.0f} {our_median / 1e6:>12.0f} {ratio:>7.3f}"
            )

            # Memory: our process while it serves a 1 GiB file.
            big = root / "big"
            write_file(big, args.rss_size_mib)
            big_size = big.stat().st_size
            pid = ours.pid
            try:  # reset VmHWM so it covers this download only (Linux >= 4.0)
                Path(f"/proc/{pid}/clear_refs").write_text("5")
                hwm_reset = True
            except OSError:
                hwm_reset = False
            idle = proc_status(pid)
            sampler = RssSampler(pid)
            sampler.start()
            speed = curl_speed(f"http://127.0.0.1:{our_port}/big", big_size)
            sampler.stop()
            after = proc_status(pid)
            peak = max(sampler.peak_kib, after["VmHWM"] if hwm_reset else 0)
            print(
                f"RSS serving {args.rss_size_mib} MiB at {speed / 1e6:.0f} MB/s: "
                f"idle {idle['VmRSS'] / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB "
                f"(+{(peak - idle['VmRSS']) / 1024:.1f} MiB over idle), "
                f"after {after['VmRSS'] / 1024:.1f} MiB"
                + ("" if hwm_reset else " [VmHWM not resettable: sampled peak only]")
            )
            print(f"rss_over_idle_mib={(peak - idle['VmRSS']) / 1024:.1f}")
        finally:
            stop(ours)
            stop(nginx)
        print(f"serve_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
