"""Witness cosigning with real node processes on 127.0.0.1 (issue: witnesses).

Witnesses are nodes started with ``--witness-key``; the build node asks them (``--witness
URL,KEY``) to cosign every block; nodes and ``pyrsia verify`` with ``--witness-policy``
trust only checkpoints with K cosignatures. The split-view test makes the build node
equivocate (the test-only ``PYRSIA_TEST_FORK_PEERS`` fault).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct
from pathlib import Path

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from support.fixtures import SeededUpstream
from support.net import free_port
from support.node import NodeProcess, node_status, run_cli, wait_until

from pyrsia_core import Cosigner, Ed25519Signer

pytestmark = pytest.mark.process
FAST = ("--sync-interval", "0.5")
IMAGE = "alpine:3.16.2"
MANIFEST = "/v2/library/alpine/manifests/3.16.2"
ACCEPT = {"accept": "application/vnd.docker.distribution.manifest.v2+json, "
                    "application/vnd.docker.distribution.manifest.list.v2+json, "
                    "application/vnd.oci.image.index.v1+json, "
                    "application/vnd.oci.image.manifest.v1+json"}


class Keys:
    """A node's identity and witness keys, written into its data dir before it starts."""

    def __init__(self, data: Path) -> None:
        data.mkdir(parents=True, exist_ok=True)
        self.data = data
        self.node = Ed25519Signer.generate()
        (data / "node.key").write_bytes(self.node.to_pem())
        self.witness = Ed25519Signer.generate()
        (data / "witness.key").write_bytes(self.witness.to_pem())
        self.name = f"pyrsia-witness/{self.node.node_id}"
        self.vkey = Cosigner(self.name, self.witness.public_key).vkey()


def independent_cosignature_check(note: str, name: str, public_key: bytes) -> int:
    """A verifier written from the C2SP texts alone (signed-note, tlog-cosignature), sharing
    no code with pyrsia: the timestamp of ``name``'s valid cosignature line on ``note``."""
    body, sep, sigs = note.rpartition("\n\n")
    assert sep, "a signed note has a blank line before its signatures"
    text = body + "\n"
    key_id = hashlib.sha256(name.encode() + b"\n\x04" + public_key).digest()[:4]
    for line in sigs.rstrip("\n").split("\n"):
        assert line.startswith("\u2014 ")
        line_name, _, b64 = line[2:].partition(" ")
        raw = base64.b64decode(b64, validate=True)
        if line_name != name or raw[:4] != key_id:
            continue  # unknown keys are ignored
        assert len(raw) == 4 + 8 + 64
        (timestamp,) = struct.unpack(">Q", raw[4:12])
        message = f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()
        Ed25519PublicKey.from_public_bytes(public_key).verify(raw[12:], message)
        return int(timestamp)
    raise AssertionError(f"no cosignature by {name} on the checkpoint")


def wait_for(what: str, nodes: list[NodeProcess], check: object, timeout: float = 30) -> None:
    """:func:`wait_until`, failing with the tails of the nodes' logs."""
    try:
        wait_until(what, check, timeout=timeout)
    except AssertionError as exc:
        logs = "\n".join(f"--- {n.url}\n{n.log()[-2500:]}" for n in nodes)
        raise AssertionError(f"{exc}\n{logs}") from None


async def stored_certificates(data_dir: Path) -> list[str]:
    """The certificates of every block in a stopped node's ledger."""
    from pyrsia_storage_leveldb import LevelDBStore

    from pyrsia_core import LogStore

    kv = LevelDBStore(data_dir / "ledger")
    try:
        store = await LogStore.open(kv)
        out = []
        for height in range(store.ledger.height + 1):
            cert = await store.certificate(height)
            assert cert is not None
            out.append(cert.to_text())
        return out
    finally:
        await kv.aclose()


async def certificate_and_proofs(data_dir: Path, height: int
                                 ) -> tuple[str, dict[int, list[str]]]:
    """Block ``height``'s certificate in a (copied) ledger, and base64 consistency proofs
    to its size from every smaller size."""
    from pyrsia_storage_leveldb import LevelDBStore

    from pyrsia_core import Checkpoint, LogStore

    kv = LevelDBStore(data_dir / "ledger")
    try:
        store = await LogStore.open(kv)
        cert = await store.certificate(height)
        assert cert is not None
        size = Checkpoint.from_text(cert.text).size
        proofs = {old: [base64.b64encode(h).decode() for h in
                        store.consistency_proof(old, size)] if 0 < old < size else []
                  for old in range(size + 1)}
        return cert.to_text(), proofs
    finally:
        await kv.aclose()


def witnesses_for(tmp_path: Path, count: int) -> tuple[list[Keys], list[int], list[str]]:
    """Keys and free ports for ``count`` witnesses, and the ``--witness URL,VKEY`` options
    that name them to a build node."""
    keys = [Keys(tmp_path / f"w{i}" / "data") for i in range(count)]
    ports = [free_port() for _ in keys]
    targets: list[str] = []
    for k, port in zip(keys, ports, strict=True):
        targets += ["--witness", f"http://127.0.0.1:{port},{k.vkey}"]
    return keys, ports, targets


def start_witnesses(tmp_path: Path, keys: list[Keys], ports: list[int], peer: str
                    ) -> list[NodeProcess]:
    out = []
    for i, (k, port) in enumerate(zip(keys, ports, strict=True)):
        out.append(NodeProcess(tmp_path / f"w{i}", port=port, data_dir=k.data, upstream=None,
                               extra=(*FAST, "--peer", peer, "--witness-key")).start())
    return out


def policy_args(keys: list[Keys], threshold: int) -> tuple[str, ...]:
    out: list[str] = []
    for k in keys:
        out += ["--witness-policy", k.vkey]
    return (*out, "--witness-threshold", str(threshold))


def proof_checkpoint(node: NodeProcess, tmp_path: Path, image: str = IMAGE) -> str:
    out = run_cli(tmp_path, "inspect-log", "docker", "--image", image, "--proof",
                  port=node.port)
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)[0]["proof"]["checkpoint"])


def test_blocks_are_cosigned_published_and_enforced(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    wkeys, ports, targets = witnesses_for(tmp_path, 3)
    nodes: list[NodeProcess] = []
    try:
        build = NodeProcess(tmp_path / "b", upstream=fresh_seeded_upstream.url,
                            extra=(*FAST, *targets)).start()
        nodes.append(build)
        nodes += start_witnesses(tmp_path, wkeys, ports, build.url)
        # A witness shows its name and key, for an operator to copy.
        w_status = node_status(nodes[1])
        assert w_status["witness"]["vkey"] == wkeys[0].vkey
        assert wkeys[0].vkey in run_cli(tmp_path, "status", port=nodes[1].port).stdout
        trusting = NodeProcess(tmp_path / "p", upstream=None,
                               extra=(*FAST, "--peer", build.url, *policy_args(wkeys, 2)))
        nodes.append(trusting.start())
        # A node whose policy no witness of this network can meet (an unknown witness).
        stranger = Keys(tmp_path / "x" / "data")
        strict = NodeProcess(tmp_path / "s", upstream=None,
                             extra=(*FAST, "--peer", build.url, *policy_args([stranger], 1)))
        nodes.append(strict.start())

        out = run_cli(tmp_path, "build", "docker", "--image", IMAGE, "--wait", "120",
                      port=build.port, timeout=150)
        assert out.returncode == 0, out.stderr + build.log()[-3000:]
        height = node_status(build)["ledger_height"]
        wait_for("the three cosignatures", nodes, lambda: proof_checkpoint(build, tmp_path).count(
            "pyrsia-witness/") == 3, timeout=30)
        note = proof_checkpoint(build, tmp_path)
        for k in wkeys:
            assert independent_cosignature_check(note, k.name, k.witness.public_key.raw) > 0
        assert "Witnesses cosigned block" in build.log()

        # The trusting node adopts the witnessed block and serves the image.
        wait_for("the trusting node to sync", nodes,
                   lambda: node_status(trusting)["ledger_height"] == height)
        assert node_status(trusting)["witness_policy"]["trusted_height"] == height
        assert httpx.get(trusting.url + MANIFEST, headers=ACCEPT, timeout=60).status_code == 200
        # The strict node never adopts it (not witnessed by its policy) and serves nothing.
        assert node_status(strict)["ledger_height"] == 0
        resp = httpx.get(strict.url + MANIFEST, headers=ACCEPT, timeout=60)
        assert resp.status_code == 404
        assert "not adopted" in strict.log() and "not witnessed" in strict.log()

        # pyrsia verify with a policy: accepted with the witnesses, refused with another.
        ok = run_cli(tmp_path, "verify", "docker", "--image", IMAGE, "--data-dir",
                     str(build.data_dir), *policy_args(wkeys, 3))
        assert ok.returncode == 0, ok.stderr
        assert "Witnessed" in ok.stdout and "3 of the policy's witnesses" in ok.stdout
        bad = run_cli(tmp_path, "verify", "docker", "--image", IMAGE, "--data-dir",
                      str(build.data_dir), *policy_args([stranger], 1))
        assert bad.returncode == 1 and "verification FAILED" in bad.stderr
        assert "no checkpoint with 1 valid cosignatures" in bad.stderr
        usage = run_cli(tmp_path, "verify", "docker", "--image", IMAGE, "--data-dir",
                        str(build.data_dir), "--witness-policy", "nonsense")
        assert usage.returncode == 2 and "Traceback" not in usage.stderr

        # The trusting node restarted with a policy its blocks do not meet: it keeps them
        # but serves nothing of them, naming the policy.
        port, data = trusting.port, trusting.data_dir
        trusting.stop()
        nodes.remove(trusting)
        again = NodeProcess(tmp_path / "p", port=port, data_dir=data, upstream=None,
                            extra=(*FAST, "--peer", build.url, *policy_args([stranger], 1)))
        nodes.append(again.start())
        assert node_status(again)["ledger_height"] == height
        assert node_status(again)["witness_policy"]["trusted_height"] == -1
        resp = httpx.get(again.url + MANIFEST, headers=ACCEPT, timeout=60)
        assert resp.status_code == 404
        assert resp.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        logged = run_cli(tmp_path, "inspect-log", "docker", "--image", IMAGE, port=again.port)
        assert logged.returncode == 1
        assert "not served: no checkpoint with 1 witness cosignatures" in again.log()
        assert "witness policy: 1 of " + stranger.name in again.log()
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.parametrize("args, message", [
    (("--witness", "nonsense"), "expected URL,KEY"),
    (("--witness", "http://127.0.0.1:1,name=zz"), "witness 'name'"),
    (("--witness-threshold", "1"), "needs --witness-policy"),
    (("--witness-policy", "a=" + "00" * 31), "--witness-policy"),
])
def test_bad_witness_options_are_usage_errors(tmp_path: Path, args: tuple[str, ...],
                                              message: str) -> None:
    out = run_cli(tmp_path, "node", "start", "--no-upstream", "-p", str(free_port()),
                  "--data-dir", str(tmp_path / "d"), *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    out = run_cli(tmp_path, "node", "start", "--no-upstream", "-p", str(free_port()),
                  "--data-dir", str(tmp_path / "d"), *policy_args([Keys(tmp_path / "k")], 2))
    assert out.returncode == 2 and "threshold must be 1..1" in out.stderr


def test_witness_endpoint_follows_the_spec(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    """The add-checkpoint endpoint over HTTP: 409 with text/x.tlog.size, 404, 403, 400."""
    k = Keys(tmp_path / "w" / "data")
    port = free_port()
    with NodeProcess(tmp_path / "b", upstream=fresh_seeded_upstream.url,
                     extra=(*FAST, "--witness", f"http://127.0.0.1:{port},{k.vkey}")) as build:
        (w,) = start_witnesses(tmp_path, [k], [port], build.url)
        try:
            out = run_cli(tmp_path, "build", "docker", "--image", IMAGE, "--wait", "120",
                          port=build.port, timeout=150)
            assert out.returncode == 0, out.stderr
            wait_for("a cosignature", [build, w],
                     lambda: k.name in proof_checkpoint(build, tmp_path))
            note = proof_checkpoint(build, tmp_path)
            size = int(note.split("\n")[1])
            url = w.url + "/witness/add-checkpoint"
            stale = httpx.post(url, content=f"old 0\n\n{note}".encode(), timeout=30)
            assert stale.status_code == 409
            assert stale.headers["content-type"].startswith("text/x.tlog.size")
            assert stale.text == f"{size}\n"
            same = httpx.post(url, content=f"old {size}\n\n{note}".encode(), timeout=30)
            assert same.status_code == 200 and same.text.startswith(f"\u2014 {k.name} ")
            unsigned = note.split("\n\n")[0] + "\n\n\u2014 x AAAAAAAAAAAAAAAAAAAAAAA=\n"
            assert httpx.post(url, content=f"old {size}\n\n{unsigned}".encode(),
                              timeout=30).status_code == 403
            other = note.replace(note.split("\n")[0], "other/log", 1)
            assert httpx.post(url, content=f"old {size}\n\n{other}".encode(),
                              timeout=30).status_code == 404
            assert httpx.post(url, content=b"garbage", timeout=30).status_code == 400
            assert httpx.get(url, timeout=30).status_code == 405
            assert node_status(w)["split_views"] == []
        finally:
            w.stop()


def test_split_view_is_cosigned_once_reported_and_never_served(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    """The build node signs two blocks at one height: the real one for group 1 and a fork
    (the image under the tag 3.16.2-fork) for group 2, and asks the witnesses to cosign
    both. At most one history gets cosigned; the evidence is reported; the node with a
    witness policy in group 2 is never served from the fork."""
    wkeys, ports, targets = witnesses_for(tmp_path, 3)
    victim_keys, guarded_keys = Keys(tmp_path / "v" / "data"), Keys(tmp_path / "g" / "data")
    fork_env = {"PYRSIA_TEST_FORK_PEERS":
                f"{victim_keys.node.node_id},{guarded_keys.node.node_id}"}
    nodes: list[NodeProcess] = []
    try:
        build = NodeProcess(tmp_path / "b", upstream=fresh_seeded_upstream.url,
                            extra=(*FAST, *targets), env=fork_env).start()
        nodes.append(build)
        nodes += start_witnesses(tmp_path, wkeys, ports, build.url)
        victim = NodeProcess(tmp_path / "v", data_dir=victim_keys.data, upstream=None,
                             extra=(*FAST, "--peer", build.url)).start()
        guarded = NodeProcess(tmp_path / "g", data_dir=guarded_keys.data, upstream=None,
                              extra=(*FAST, "--peer", build.url, *policy_args(wkeys, 2))
                              ).start()
        nodes += [victim, guarded]
        wait_for("the nodes to know each other", nodes, lambda: all(
            node_status(n)["peers_count"] >= 5 for n in nodes), timeout=30)

        out = run_cli(tmp_path, "build", "docker", "--image", IMAGE, "--wait", "120",
                      port=build.port, timeout=150)
        assert out.returncode == 0, out.stderr
        height = node_status(build)["ledger_height"]
        wait_for("the fork attempt", nodes, lambda: "TEST FAULT: fork of block" in build.log(),
                   timeout=30)
        # At most one history is cosigned: every witness cosigned the real block, none the
        # fork, and each kept the fork as split-view evidence.
        assert f"fork of block {height} cosigned by 0 of 3 witnesses" in build.log()
        note = proof_checkpoint(build, tmp_path)
        for k in wkeys:
            independent_cosignature_check(note, k.name, k.witness.public_key.raw)
        real_body = note.split("\n\n")[0]
        for w in nodes[1:4]:
            views = node_status(w)["split_views"]
            assert views and any("two roots" in v["reason"] for v in views)
            assert all(v["first"].startswith(real_body) for v in views
                       if "two roots" in v["reason"])

        # The victim without a policy took the fork, then saw the real block: evidence,
        # reported by pyrsia status and in its log.
        wait_for("the victim to report the split view", nodes,
                   lambda: node_status(victim)["split_views"] != [], timeout=30)
        assert "SPLIT VIEW" in run_cli(tmp_path, "status", port=victim.port).stdout
        assert "SPLIT VIEW detected" in victim.log()

        # The guarded node refused the unwitnessed fork and follows the witnessed history.
        wait_for("the guarded node to adopt the witnessed block", nodes,
                   lambda: node_status(guarded)["ledger_head"] == node_status(build)[
                       "ledger_head"], timeout=30)
        assert node_status(guarded)["witness_policy"]["trusted_height"] == height
        # It got the fork: refused as unwitnessed, or (had it synced the real block from
        # the build node first) kept as split-view evidence.
        wait_for("the guarded node to see the fork", nodes, lambda: "not witnessed" in
                 guarded.log() or node_status(guarded)["split_views"] != [])
        fork = httpx.get(guarded.url + "/v2/library/alpine/manifests/3.16.2-fork",
                         headers=ACCEPT, timeout=60)
        assert fork.status_code == 404
        logged = run_cli(tmp_path, "inspect-log", "docker", "--image", "alpine:3.16.2-fork",
                         port=guarded.port)
        assert logged.returncode != 0
        assert httpx.get(guarded.url + MANIFEST, headers=ACCEPT, timeout=60).status_code == 200
        # Offline, with the policy: the witnessed history verifies, the fork never does
        # (not even from the victim's data dir, whichever history it kept).
        ok = run_cli(tmp_path, "verify", "docker", "--image", IMAGE, "--data-dir",
                     str(guarded.data_dir), *policy_args(wkeys, 2))
        assert ok.returncode == 0 and "Witnessed" in ok.stdout, ok.stderr
        for n in (victim, guarded):
            forked = run_cli(tmp_path, "verify", "docker", "--image", "alpine:3.16.2-fork",
                             "--data-dir", str(n.data_dir), *policy_args(wkeys, 2))
            assert forked.returncode == 1 and "verification FAILED" in forked.stderr

        # A node joining later through the victim gets no gossip of block 1: it syncs one
        # history and finds the other as the head of a peer at its height.
        late = NodeProcess(tmp_path / "late", upstream=None,
                           extra=(*FAST, "--peer", victim.url)).start()
        nodes.append(late)
        wait_for("the late node to sync", nodes,
                 lambda: node_status(late)["ledger_height"] == height)
        wait_for("the late node to report the split view", nodes,
                 lambda: node_status(late)["split_views"] != [])
        assert "SPLIT VIEW detected" in late.log()
    finally:
        for n in nodes:
            n.stop()


def test_build_nodes_in_consensus_each_collect_cosignatures(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    """Three build nodes commit by consensus and each asks the same two witnesses for
    every block (authorizations too): the witnesses cosign each checkpoint for all of them
    (the later askers learn the size from a 409), see no split view, and a node with a
    policy follows the whole chain."""
    wkeys, ports, targets = witnesses_for(tmp_path, 2)
    nodes: list[NodeProcess] = []
    try:
        a = NodeProcess(tmp_path / "a", upstream=fresh_seeded_upstream.url,
                        extra=(*FAST, *targets)).start()
        nodes.append(a)
        nodes += start_witnesses(tmp_path, wkeys, ports, a.url)
        builders = [a]
        for name in "bc":
            n = NodeProcess(tmp_path / name, upstream=fresh_seeded_upstream.url,
                            extra=(*FAST, "--peer", a.url, *targets)).start()
            nodes.append(n)
            builders.append(n)
        trusting = NodeProcess(tmp_path / "p", upstream=None,
                               extra=(*FAST, "--peer", a.url, *policy_args(wkeys, 2))).start()
        nodes.append(trusting)
        for peer in builders[1:]:
            out = run_cli(tmp_path, "authorize", "--peer", node_status(peer)["node_id"],
                          "--data-dir", str(a.data_dir), "--force", port=a.port, timeout=120)
            assert out.returncode == 0, out.stderr + a.log()[-3000:]
        # Block 2 (signed by A and B) added C. A witness that adopted it since checks it
        # by the block it holds: today's three build nodes did not all sign it.
        w0 = nodes[1]
        wait_for("the witness to adopt block 2", nodes,
                 lambda: node_status(w0)["ledger_height"] == 2)
        copy = tmp_path / "a-ledger"
        shutil.copytree(a.data_dir / "ledger", copy / "ledger",
                        ignore=shutil.ignore_patterns("LOCK"))
        block2, proof_from = anyio.run(certificate_and_proofs, copy, 2)
        url = w0.url + "/witness/add-checkpoint"
        size = int(httpx.post(url, content=f"old 0\n\n{block2}".encode(), timeout=30).text)
        proof = "".join(line + "\n" for line in proof_from[size])
        resp = httpx.post(url, content=f"old {size}\n{proof}\n{block2}".encode(), timeout=30)
        assert resp.status_code == 200, resp.text
        independent_cosignature_check(block2.rstrip("\n") + "\n" + resp.text, wkeys[0].name,
                                      wkeys[0].witness.public_key.raw)

        out = run_cli(tmp_path, "build", "docker", "--image", IMAGE, "--wait", "120",
                      port=builders[1].port, timeout=150)
        assert out.returncode == 0, out.stderr + builders[1].log()[-3000:]
        height = node_status(a)["ledger_height"]
        assert height == 3  # two authorizations, one build
        for n in builders:
            wait_for(f"{n.url} to store both cosignatures", nodes, lambda n=n: proof_checkpoint(
                n, tmp_path).count("pyrsia-witness/") == 2, timeout=30)
            note = proof_checkpoint(n, tmp_path)
            for k in wkeys:
                independent_cosignature_check(note, k.name, k.witness.public_key.raw)
        wait_for("the trusting node to follow the chain", nodes,
                   lambda: node_status(trusting)["ledger_height"] == height)
        assert node_status(trusting)["witness_policy"]["trusted_height"] == height
        assert httpx.get(trusting.url + MANIFEST, headers=ACCEPT, timeout=60).status_code == 200
        for n in nodes:
            assert node_status(n)["split_views"] == [], n.log()[-2000:]
        # Each build node collects for the blocks it committed itself: A all three, B
        # the two after its authorization, C the build.
        own = {a.url: (1, 2, 3), builders[1].url: (2, 3), builders[2].url: (3,)}
        for n in builders:
            wait_for("every build node's collection", nodes, lambda n=n: all(
                f"Witnesses cosigned block {h}:" in n.log() for h in own[n.url]))
    finally:
        for n in nodes:
            n.stop()
    # Every build node stored both cosignatures of every block, even of blocks that
    # changed the build nodes (a witness that adopted the block already verifies it by
    # the block it holds, not by today's build nodes).
    for n in builders:
        certificates = anyio.run(stored_certificates, n.data_dir)
        assert len(certificates) == 4
        for height in own[n.url]:
            note = certificates[height]
            assert note.count("pyrsia-witness/") == 2, (height, note, n.log()[-3000:])
