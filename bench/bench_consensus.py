"""Consensus among 4 build-node processes on 127.0.0.1 (issue: consensus).

    python bench/bench_consensus.py [--builds 10] [--queued 24 --layers 40] [--keep-logs DIR]

Four nodes, three of them authorized by the first (each authorization is itself a
block committed by the build nodes in force). Then ``--builds`` images are built one
after another on a build node. Reported: from the end of the build (artifacts
fetched, verified, stored; records signed) to the commit of the block holding them,
which includes every other validator rebuilding the image from its own upstream; and
from the last validator's rebuild result to that commit (the goal: < 100 ms median):
proposal, prevotes, precommits with the checkpoint signatures, the block appended.

Then ``--queued`` images of ``--layers`` layers are requested at once from three
build nodes. Reported: records per second end to end (bounded by four nodes each
building every image), and records per second of consensus itself: the records of
the blocks that hold them over the sum of their proposal-to-commit times (the goal:
>= 1,000 records/s batched).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import start_nginx
from support.images import ImageSpec, seed_images
from support.node import NodeProcess, run_cli
from support.registry import UpstreamRegistry

FAST = ("--sync-interval", "0.5")
LATENCY = re.compile(
    r"^(\S+ \S+) .*Consensus latency: (\d+) record\(s\) of (\S+) committed in block \d+ "
    r"([\d.]+) ms", re.M)
COMMITTED = re.compile(r"Consensus committed block (\d+) \((\d+) records\) with a quorum "
                       r"certificate, ([\d.]+) ms after its proposal")
VOUCHED = re.compile(r"^(\S+ \S+) .*Rebuilt and vouched for \d+ pending record\(s\) of (\S+)$",
                     re.M)


def stamp(text: str) -> float:
    """Log timestamp (``2026-11-28 06:34:00,981``) -> seconds."""
    import datetime

    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


_HTTP = httpx.Client(timeout=120)  # one connection, not one per poll

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
# The upstream API on static files: /v2/ answers, manifests carry their media type.
MIRROR_LOCATIONS = (
    'location = /v2/ { return 200 "{}"; }\n'
    f"        location ~ /manifests/ {{ default_type {MANIFEST_V2}; }}"
)


class StaticMirror:
    """The seeded images, copied out of the registry and served by nginx as static files.

    On this 2-core machine Debian's docker-registry takes 1 ms of CPU for ``GET /v2/``
    and 3-4 ms for a 1 KiB blob (measured), so the upstream took 0.75 of a core from the
    four nodes under test. A real upstream runs elsewhere; nginx serves the same bytes
    and headers (content type, length) for a small fraction of that.
    """

    def __init__(self, registry_url: str, images: list[tuple[str, str]], workdir: Path) -> None:
        self.workdir = workdir
        root = workdir / "root"
        for up in (workdir.parent, workdir):  # nginx's workers read as an unprivileged user
            up.mkdir(exist_ok=True)
            up.chmod(0o755)
        with httpx.Client(timeout=60) as http:
            for repo, tag in images:
                base = f"{registry_url}/v2/{repo}"
                r = http.get(f"{base}/manifests/{tag}", headers={"Accept": MANIFEST_V2})
                r.raise_for_status()
                manifest = r.json()
                target = root / "v2" / repo
                (target / "manifests").mkdir(parents=True, exist_ok=True)
                (target / "blobs").mkdir(parents=True, exist_ok=True)
                (target / "manifests" / tag).write_bytes(r.content)
                (target / "manifests" / r.headers["docker-content-digest"]).write_bytes(r.content)
                for d in [manifest["config"], *manifest["layers"]]:
                    blob = http.get(f"{base}/blobs/{d['digest']}")
                    blob.raise_for_status()
                    (target / "blobs" / d["digest"]).write_bytes(blob.content)
        self.proc, self.port = start_nginx(workdir, root, MIRROR_LOCATIONS)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def status(n: NodeProcess) -> dict:  # type: ignore[type-arg]
    return _HTTP.get(f"{n.url}/api/status").json()  # type: ignore[no-any-return]


def consensus_line(blocks: list[tuple[int, int, float]], note: str) -> float:
    """Print the records/s of consensus itself over ``(height, records, ms)`` blocks."""
    in_blocks = sum(n for _, n, _ in blocks)
    seconds = sum(ms for _, _, ms in blocks) / 1000
    rate = in_blocks / seconds
    print(f"   consensus: {len(blocks)} blocks, {in_blocks} records, {seconds * 1000:.0f} ms "
          f"from proposals to commits = {rate:,.0f} records/s {note}")
    return rate


def build_and_wait(home: Path, node: NodeProcess, image: str) -> None:
    out = run_cli(home, "build", "docker", "--image", image, port=node.port, timeout=120)
    assert out.returncode == 0, out.stderr
    build_id = out.stdout.split("ID ")[1].split()[0]
    deadline = time.monotonic() + 120
    while "SUCCESS" not in run_cli(home, "build", "status", "--id", build_id,
                                   port=node.port).stdout:
        assert time.monotonic() < deadline, node.log()[-2000:]
        time.sleep(0.05)


def queue_builds(nodes: list[NodeProcess], images: list[str]) -> None:
    """Request every build at once (the node API, as `pyrsia build docker` does), spread
    over the build nodes b, c and d."""
    with httpx.Client(timeout=60) as http:
        for i, image in enumerate(images):
            r = http.post(f"{nodes[1 + i % 3].url}/api/build/docker", json={"image": image})
            assert r.status_code == 202, r.text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--builds", type=int, default=10, help="sequential builds (latency)")
    parser.add_argument("--queued", type=int, default=24, help="builds queued at once")
    parser.add_argument("--layers", type=int, default=40, help="layers of each queued image")
    parser.add_argument("--keep-logs", help="copy the nodes' logs to this directory")
    parser.add_argument("--debug", action="store_true", help="nodes log at debug level")
    parser.add_argument("--registry-upstream", action="store_true",
                        help="build from docker-registry itself, not from its static copy")
    args = parser.parse_args()
    extra = (*FAST, "--log-level", "debug") if args.debug else FAST
    work = Path(tempfile.mkdtemp(prefix="pyrsia-bench-consensus-"))
    specs = [ImageSpec(f"library/img{i}", "1.0", "v2s2", seed=f"bench-{i}")
             for i in range(args.builds)]
    specs += [ImageSpec(f"library/many{i}", "1.0", "v2s2", seed=f"many-{i}", layers=args.layers,
                        layer_size=1024) for i in range(args.queued)]
    # The same images under a second tag (pushed after the first: the registry does not
    # take two pushes of the same blobs to one repository at once).
    retagged = [ImageSpec(f"library/many{i}", "1.1", "v2s2", seed=f"many-{i}",
                          layers=args.layers, layer_size=1024) for i in range(args.queued)]
    nodes: list[NodeProcess] = []
    mirror: StaticMirror | None = None
    try:
        with UpstreamRegistry(work / "up") as reg:
            seed_images(reg, specs, workdir=work / "seed")
            seed_images(reg, retagged, workdir=work / "seed2")
            if args.registry_upstream:
                upstream = reg.url
            else:
                mirror = StaticMirror(reg.url, [(s.repo, s.tag)
                                                for s in [*specs, *retagged]], work / "mirror")
                upstream = mirror.url
            a = NodeProcess(work / "a", upstream=upstream, extra=extra).start()
            nodes.append(a)
            for name in "bcd":
                nodes.append(NodeProcess(work / name, upstream=upstream,
                                         extra=(*extra, "--peer", a.url)).start())
            for i, peer in enumerate(nodes[1:]):
                out = run_cli(work, "authorize", "--peer", status(peer)["node_id"],
                              "--data-dir", str(a.data_dir), *(["--force"] if i < 2 else []),
                              port=a.port, timeout=120)
                assert out.returncode == 0, out.stderr
            # Sequential builds: latency from build end to commit.
            for i in range(args.builds):
                build_and_wait(work, nodes[1], f"img{i}:1.0")
            builder_log = nodes[1].log()
            latencies = [float(ms) for _, _, _, ms in LATENCY.findall(builder_log)]
            # From the last validator's rebuild result (its vouch) to the commit.
            vouches: dict[str, float] = {}
            for n in nodes:
                for ts, package in VOUCHED.findall(n.log()):
                    vouches[package] = max(vouches.get(package, 0.0), stamp(ts))
            after_last = [
                (stamp(ts) - vouches[package]) * 1000
                for ts, _, package, _ in LATENCY.findall(builder_log) if package in vouches
            ]
            # Queued builds, many records each: end-to-end records/s (bounded by the
            # builds and rebuilds) and records/s of consensus itself (proposal -> commit,
            # summed over the blocks that hold them, as node a saw them).
            height_before = status(a)["ledger_height"]
            before = status(a)["log_records"]
            t = time.perf_counter()
            queue_builds(nodes, [f"many{i}:1.0" for i in range(args.queued)])
            expected = before + args.queued * (args.layers + 3)
            deadline = time.monotonic() + 600
            while status(a)["log_records"] < expected:
                assert time.monotonic() < deadline, "queued builds did not commit"
                time.sleep(0.1)
            queued = time.perf_counter() - t
            records = status(a)["log_records"] - before
            blocks = [(int(h), int(n), float(ms)) for h, n, ms in COMMITTED.findall(a.log())
                      if int(h) > height_before]
            # The same images under a second tag: every node holds the blobs already, so a
            # build or rebuild is a manifest fetch -- what remains is the cost of records,
            # messages and consensus.
            height_before = status(a)["ledger_height"]
            before = status(a)["log_records"]
            t = time.perf_counter()
            queue_builds(nodes, [f"many{i}:1.1" for i in range(args.queued)])
            expected = before + args.queued * (args.layers + 3)
            while status(a)["log_records"] < expected:
                assert time.monotonic() < deadline + 600, "retagged builds did not commit"
                time.sleep(0.1)
            retag = time.perf_counter() - t
            retag_records = status(a)["log_records"] - before
            retag_blocks = [(int(h), int(n), float(ms)) for h, n, ms in COMMITTED.findall(a.log())
                            if int(h) > height_before]
        print(f"4 build nodes, {args.builds} sequential builds: commit latency after the build "
              f"median {statistics.median(latencies):.0f} ms, min {min(latencies):.0f} ms, max "
              f"{max(latencies):.0f} ms")
        if after_last:
            print(f"   from the last validator's rebuild result to the commit: median "
                  f"{statistics.median(after_last):.0f} ms, max {max(after_last):.0f} ms "
                  f"(goal < 100 ms median)")
        print(f"{args.queued} builds of {args.layers + 3} records queued on 3 build nodes at once: "
              f"{records} records committed in {queued:.2f} s end to end = "
              f"{records / queued:.0f} records/s (bounded by 4 x {args.queued} image builds)")
        if blocks:
            rate = consensus_line(blocks, "batched (goal >= 1,000/s)")
            print(f"consensus_records_per_s={rate:.0f}")
        print(f"the same {args.queued} images under a new tag (blobs already held, builds are "
              f"manifest fetches): {retag_records} records in {retag:.2f} s end to end = "
              f"{retag_records / retag:,.0f} records/s")
        if retag_blocks:
            consensus_line(retag_blocks, "(blocks as small as the builds arrive)")
        print(f"retag_records_per_s={retag_records / retag:.0f}")
        print(f"consensus_latency_ms={statistics.median(after_last or latencies):.1f}")
    finally:
        for n in nodes:
            n.stop()
        if mirror is not None:
            mirror.stop()
        if args.keep_logs:
            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            for i, n in enumerate(nodes):
                shutil.copy(n.log_path, Path(args.keep_logs) / f"node{i}.log")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
