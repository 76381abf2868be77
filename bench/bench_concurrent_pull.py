"""Many clients pulling one uncached image at once through one fresh node (issue #14).

    python bench/bench_concurrent_pull.py [--clients 16] [--client curl|skopeo]
                                          [--mib 100] [--layers 3] [--runs 3]
                                          [--upstream-rate 50MB/s]

An image of ``--layers`` layers totalling ``--mib`` MiB is pushed to a local Debian
``docker-registry``. Interleaved, run by run (the order swapped every run), each on a
fresh node (cold):

* single: one client pulls the image;
* concurrent: ``--clients`` clients start pulling it at the same moment; the time until
  the last one is done.

The client is ``curl`` (default: a manifest GET, then every blob at once with
``curl --parallel`` to ``/dev/null``; light, so the node's work is what is measured on a
small machine) or ``skopeo`` (``skopeo copy`` to a ``dir:``: each writes and hashes the
whole image, so N of them cost N times one on the clients' side).

The same clients then pull again from the node's cache (warm): what serving them costs
without any fetch, printed with the cold-over-warm ratio. Checked in the registry's access
log: during the concurrent pull the upstream served each blob exactly once. Goal: the last
client done within 1.2x of a single cold pull. Prints
``concurrent_pull_ratio=<ratio>``, ``concurrent_cold_over_warm_ratio=<ratio>`` and
``concurrent_upstream_fetches_per_blob=<max>``.

On loopback a single pull is bound by CPU, and serving N clients costs N times the bytes
whatever the node does: ``--upstream-rate`` puts the upstream behind a link of that rate
(a proxy), as on the internet, where one fetch shared by every client is what counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ACCEPT,
    MIB,
    Image,
    RateLimitedProxy,
    drop_dirty_pages,
    median_ratio,
    parse_rate,
    push_image,
)
from support.node import NodeProcess
from support.registry import UpstreamRegistry

GOAL = 1.2
TIMEOUT = 900


def curl_pull(base: str, image: Image) -> None:
    """One client: the manifest, then every blob it names, in parallel, to /dev/null."""
    out = subprocess.run(
        ["curl", "-sf", "--max-time", str(TIMEOUT), "-H", f"Accept: {ACCEPT}",
         f"{base}/v2/{image.repo}/manifests/{image.tag}"],
        check=True, capture_output=True, timeout=TIMEOUT).stdout
    manifest = json.loads(out)
    digests = [manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])]
    argv = ["curl", "-sf", "--no-progress-meter", "--max-time", str(TIMEOUT), "--parallel",
            "--parallel-max", "8"]
    for d in digests:
        argv += ["-o", "/dev/null", f"{base}/v2/{image.repo}/blobs/{d}"]
    subprocess.run(argv, check=True, capture_output=True, timeout=TIMEOUT)


def skopeo_pull(port: int, image: Image, dest: Path) -> None:
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                    f"docker://127.0.0.1:{port}/{image.reference}", f"dir:{dest}"],
                   check=True, capture_output=True, timeout=TIMEOUT)


def pull_at_once(node: NodeProcess, image: Image, clients: int, kind: str,
                 work: Path) -> float:
    """``clients`` pulls through ``node`` started together; seconds until the last is done."""
    dests = [work / f"client{i}" for i in range(clients)]
    for d in dests:
        shutil.rmtree(d, ignore_errors=True)
    drop_dirty_pages()
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            if kind == "curl":
                curl_pull(node.url, image)
            else:
                skopeo_pull(node.port, image, dests[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    took = time.perf_counter() - t
    for d in dests:
        shutil.rmtree(d, ignore_errors=True)
    if errors:
        stderr = getattr(errors[0], "stderr", b"") or b""
        raise SystemExit(f"a pull failed: {errors[0]!r} {stderr[-2000:]!r}\n"
                         f"{node.log()[-3000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--client", choices=("curl", "skopeo"), default="curl")
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--log-level", default="info", help="the nodes' --log-level")
    parser.add_argument("--upstream-rate", metavar="RATE",
                        help="cap the upstream link (e.g. 50MB/s); default: loopback, uncapped")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-concurrent-"))
    try:
        with UpstreamRegistry(work / "upstream") as reg, contextlib.ExitStack() as stack:
            upstream = reg.url
            if args.upstream_rate:
                rate = parse_rate(args.upstream_rate)
                upstream = stack.enter_context(RateLimitedProxy(reg.port, rate)).url
            image = push_image(reg.url, "library/big", "1.0", layers=args.layers,
                               total_bytes=args.mib * MIB, work=work / "push",
                               seed=f"bench-concurrent-{args.mib}x{args.layers}")
            single: list[float] = []
            many: list[float] = []
            warm: list[float] = []
            per_blob: list[int] = []
            manifests: list[int] = []

            def measure(clients: int, out: list[float], name: str) -> None:
                with NodeProcess(work / name, upstream=upstream,
                                 extra=("--log-level", args.log_level)) as node:
                    mark = reg.mark()
                    out.append(pull_at_once(node, image, clients, args.client, work))
                    if clients > 1:
                        counts = Counter(p.rsplit("/", 1)[-1]
                                         for p in reg.blob_fetches_since(mark))
                        per_blob.append(max(counts[d] for d in image.blob_digests))
                        if set(counts) - set(image.blob_digests):
                            raise SystemExit(f"unexpected upstream blob fetches: {counts}")
                        manifests.append(len(reg.manifest_fetches_since(mark)))
                        # The same clients again, the image now in the node's cache.
                        warm.append(pull_at_once(node, image, clients, args.client, work))
                shutil.rmtree(work / name, ignore_errors=True)

            for run in range(args.runs):
                if run % 2 == 0:
                    measure(1, single, f"single{run}")
                    measure(args.clients, many, f"many{run}")
                else:
                    measure(args.clients, many, f"many{run}")
                    measure(1, single, f"single{run}")
        base, measured, ratio = median_ratio(single, many)
        mib = image.total_bytes / MIB
        client = ("curl (manifest, then the blobs with --parallel, to /dev/null)"
                  if args.client == "curl" else "skopeo copy to dir:")
        link = (f"upstream link capped at {parse_rate(args.upstream_rate) / 1e6:.0f} MB/s"
                if args.upstream_rate else "upstream on loopback, uncapped")
        print(f"image: {args.layers} layer(s), {mib:.0f} MiB; client: {client}; {link}; "
              f"median of {args.runs} runs (interleaved), a fresh node each")
        print(f"  one cold pull (baseline)                 {base:6.2f} s  "
              f"[{', '.join(f'{x:.2f}' for x in single)}]")
        print(f"  {args.clients:2d} clients at once, until the last done {measured:6.2f} s  "
              f"[{', '.join(f'{x:.2f}' for x in many)}]  ratio {ratio:.2f}x "
              f"(goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'})")
        w = median_ratio(single, warm)[1]
        print(f"  {args.clients:2d} clients at once again, warm (cache)   {w:6.2f} s  "
              f"ratio {w / base:.2f}x (what serving them costs, without any fetch); cold over "
              f"warm {measured / w:.2f}x")
        worst = max(per_blob)
        print(f"  upstream GETs per blob during the concurrent pulls: at most {worst} "
              f"(goal: exactly 1: {'met' if worst == 1 else 'NOT met'}); manifest "
              f"requests upstream per run: {manifests}")
        print(f"concurrent_pull_ratio={ratio:.3f}")
        print(f"concurrent_cold_over_warm_ratio={measured / w:.3f}")
        print(f"concurrent_upstream_fetches_per_blob={worst}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
