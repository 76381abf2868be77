"""Shared pieces of the pull benchmarks: large images pushed from files, timed clients.

Layers are written to files in 1 MiB chunks of seeded pseudo-random (incompressible)
bytes, so a 1 GiB layer is never held in memory, and pushed to a registry with its HTTP
push API (``POST /v2/<name>/blobs/uploads/``, then ``PUT <location>&digest=`` streaming
the file), followed by the config blob and an OCI manifest (layers as
``application/vnd.oci.image.layer.v1.tar``: skopeo copies them to ``dir:`` as they are).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.clients import skopeo
from support.images import upload_blob_content
from support.node import NodeProcess
from support.proxy import ThreadedProxy

MIB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
ACCEPT = ", ".join([
    OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])


@dataclass(frozen=True)
class Image:
    """An image pushed to a registry: ``repo:tag``, its manifest and blob digests."""

    repo: str
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: tuple[str, ...]
    layer_sizes: tuple[int, ...] = field(default=())

    @property
    def reference(self) -> str:
        return f"{self.repo}:{self.tag}"

    @property
    def blob_digests(self) -> tuple[str, ...]:
        return (self.config_digest, *self.layer_digests)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_sizes)


def write_layer(path: Path, size: int, seed: str) -> str:
    """``size`` bytes of seeded pseudo-random bytes written in 1 MiB chunks; the digest."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(0, size, MIB):
            chunk = random.Random(f"{seed}:{i}").randbytes(min(MIB, size - i))
            h.update(chunk)
            f.write(chunk)
    return "sha256:" + h.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(MIB):
            yield data


def upload_blob_file(client: httpx.Client, base: str, repo: str, path: Path,
                     digest: str) -> None:
    """Monolithic upload of a file, streamed (``POST`` then ``PUT ?digest=``)."""
    upload_blob_content(client, base, repo, digest, _file_chunks(path), path.stat().st_size)


def push_image(base: str, repo: str, tag: str, *, layers: int, total_bytes: int,
               work: Path, seed: str) -> Image:
    """Write ``layers`` layer files totalling ``total_bytes`` under ``work``, push them with
    a config and an OCI manifest to the registry at ``base``; the files are removed."""
    work.mkdir(parents=True, exist_ok=True)
    size = total_bytes // layers
    digests: list[str] = []
    with httpx.Client(timeout=600.0, trust_env=False) as client:
        for i in range(layers):
            path = work / f"layer{i}"
            digest = write_layer(path, size, f"{seed}:{i}")
            upload_blob_file(client, base, repo, path, digest)
            path.unlink()
            digests.append(digest)
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
            "config": {"Labels": {"org.pyrsia.bench.seed": seed}},
            "rootfs": {"type": "layers", "diff_ids": digests},
        }, sort_keys=True, separators=(",", ":")).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        cpath = work / "config"
        cpath.write_bytes(config)
        upload_blob_file(client, base, repo, cpath, config_digest)
        cpath.unlink()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_TAR, "digest": d, "size": size}
                       for d in digests],
        }, sort_keys=True, separators=(",", ":")).encode()
        resp = client.put(f"{base}/v2/{repo}/manifests/{tag}", content=manifest,
                          headers={"Content-Type": OCI_MANIFEST})
        if resp.status_code != 201:
            raise RuntimeError(f"manifest PUT {repo}:{tag}: {resp.status_code} {resp.text}")
    return Image(repo, tag, "sha256:" + hashlib.sha256(manifest).hexdigest(), config_digest,
                 tuple(digests), tuple(size for _ in digests))


def drop_dirty_pages() -> None:
    """Write back dirty pages (not timed), so one measure does not pay for another's."""
    os.sync()


def timed_copy(src: str, dest: Path, timeout: float = 1200,
               watch: Sequence[int] = ()) -> Copy:
    """``skopeo copy <src> dir:<dest>`` (dest removed before and after): its wall time,
    skopeo's CPU time and the CPU time of the processes ``watch`` over the copy."""
    shutil.rmtree(dest, ignore_errors=True)
    drop_dirty_pages()
    before = [cpu_seconds(pid) for pid in watch]
    children = _children_cpu()
    t = time.perf_counter()
    skopeo("copy", "--src-tls-verify=false", src, f"dir:{dest}", timeout=timeout)
    took = time.perf_counter() - t
    client = _children_cpu() - children
    servers = tuple(cpu_seconds(pid) - b for pid, b in zip(watch, before, strict=True))
    shutil.rmtree(dest, ignore_errors=True)
    return Copy(took, client, servers)


@dataclass(frozen=True)
class Copy:
    """One timed copy: wall seconds, the client's CPU seconds, the watched processes'."""

    seconds: float
    client_cpu: float
    server_cpu: tuple[float, ...] = ()


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def kib(pid: int, name: str) -> int:
    """A ``/proc/<pid>/status`` field (``VmRSS``, ``VmHWM``), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {name} for process {pid}")


class RssSampler:
    """Samples a process's ``VmRSS`` every ``interval`` s in a thread, until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(kib(self.pid, "VmRSS"))
            except (OSError, RuntimeError):
                return
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def height(node: NodeProcess) -> int:
    return int(httpx.get(f"{node.url}/api/status", timeout=60).json()["ledger_height"])


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def median_ratio(base: Sequence[float], measured: Sequence[float]) -> tuple[float, float, float]:
    """(median baseline, median measured, their ratio)."""
    import statistics

    b, m = statistics.median(base), statistics.median(measured)
    return b, m, m / b


def run_quiet(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True,
                          timeout=timeout)


class RateLimitedProxy(ThreadedProxy):
    """A TCP proxy on 127.0.0.1 to ``target_port`` whose replies (target to client) share
    one link of ``rate`` bytes/s, as an upstream on the internet would: on loopback every
    transfer is bound by CPU, behind this one by the link. ``with`` starts and stops it
    (an asyncio loop in a thread)."""

    def __init__(self, target_port: int, rate: float, burst: int = 256 * 1024) -> None:
        super().__init__(target_port, name="rate-proxy")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = 0.0

    def _started(self) -> None:
        self._stamp = time.monotonic()

    async def _take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= n:
                self._tokens -= n
                return
            await asyncio.sleep((n - self._tokens) / self.rate)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       limited: bool) -> None:
            while data := await src.read(64 * 1024):
                if limited:
                    await self._take(len(data))
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

        tasks = [asyncio.ensure_future(pipe(reader, up_writer, False)),
                 asyncio.ensure_future(pipe(up_reader, writer, True))]
        try:
            # Until the reply side ends (the client closing only its side does not end it).
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if not tasks[1].done():
                await asyncio.wait([tasks[1]])
        finally:
            for task in tasks:
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: a reset connection is no error here
            for w in (writer, up_writer):
                w.transport.abort()


def parse_rate(text: str) -> float:
    """``"50MB/s"`` -> 50e6 bytes/s (also ``KB``, ``MiB``, ``GB``; ``/s`` optional)."""
    value = text.strip().removesuffix("/s")
    units = {"KIB": 1024, "MIB": MIB, "GIB": 1 << 30, "KB": 1e3, "MB": 1e6, "GB": 1e9, "B": 1}
    for unit, factor in units.items():
        if value.upper().endswith(unit):
            return float(value[: -len(unit)]) * factor
    return float(value)
