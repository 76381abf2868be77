"""One build node of four sends conflicting proposals and votes (issue: hostile peers).

Real node processes: A, B, C and D are authorized build nodes. D's process is stopped and
its key (taken from its data dir) is used by the test to equivocate: for the heights the
honest nodes are deciding, it sends each of them a different proposal for the same height
and round, conflicting prevotes and precommits (for blocks of its own, for made-up hashes,
for nil), all correctly signed by a build node's key. The attack is bounded (count, time).
The three honest build nodes still commit an honest build, exactly once and in the same
ledger, and nothing of D's blocks is ever committed.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pyrsia_core._consensus import Precommit, Prevote, Proposal
from pyrsia_core._wire import open_frame, seal
from support.fixtures import SeededUpstream
from support.node import NodeProcess, node_status, run_cli, wait_until

from pyrsia_core import CommittedBlock, Ed25519Signer, Ledger, Record, SignedRecord

pytestmark = pytest.mark.process
FAST = ("--sync-interval", "0.5")
status = node_status


def _rpc(http: httpx.Client, url: str, signer: Ed25519Signer, type_: str, body: dict[str, Any],
         address: str, attachment: bytes | None = None) -> Any:
    frame = seal(signer, type_, body, address=address, now=time.time(), attachment=attachment)
    reply = http.post(f"{url}/p2p/rpc", content=frame, timeout=10)
    return open_frame(reply.content, now=time.time())


def _ledger(http: httpx.Client, url: str, evil: Ed25519Signer, address: str) -> Ledger:
    """The network's ledger as an honest node serves it (verified block by block)."""
    genesis = CommittedBlock.from_json(
        _rpc(http, url, evil, "GET_GENESIS", {}, address).body["block"])
    ledger = Ledger.start(genesis)
    head = _rpc(http, url, evil, "GET_HEAD", {}, address).body["height"]
    while ledger.height < head:
        env = _rpc(http, url, evil, "GET_BLOCKS", {"start": ledger.height + 1,
                                                     "end": head + 1}, address)
        items = json.loads(env.attachment or b"[]")
        if not items:
            raise ValueError(f"{url} served no block after {ledger.height}")
        for item in items:
            ledger.append(CommittedBlock.from_json(item), now=time.time())
    return ledger


def equivocate(urls: list[str], evil: Ed25519Signer, address: str, stop: threading.Event,
               sent: list[int], errors: list[str], limit: int = 400) -> None:
    """Until ``stop`` (at most ``limit`` frames): conflicting consensus messages from
    ``evil`` (a build node's key) for the next height, different for each honest node."""
    with httpx.Client() as http:
        while not stop.is_set() and sent[0] < limit:
            try:
                ledger = _ledger(http, urls[0], evil, address)
            except Exception as exc:  # the honest node may be busy; noted, tried again
                errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)
                continue
            height = ledger.height + 1
            for rnd in range(3):
                for i, url in enumerate(urls):
                    record = SignedRecord.sign(Record.new(
                        signer=evil, package_type="Docker", package_specific_id=f"evil{i}:1",
                        package_specific_artifact_id=f"evil{i}:1",
                        artifact_hash=hashlib.sha256(f"{i}{rnd}{height}".encode()).hexdigest(),
                        num_artifacts=1, timestamp=int(time.time())), evil)
                    block = ledger.propose(proposer=evil, records=[record],
                                           timestamp=int(time.time()))
                    fake = hashlib.sha256(f"fake{i}{rnd}".encode()).hexdigest()
                    messages = [
                        Proposal.create(evil, ledger.origin, height=height, round=rnd,
                                        block=block),
                        Prevote.create(evil, ledger.origin, height=height, round=rnd,
                                       block_hash=block.hash),
                        Prevote.create(evil, ledger.origin, height=height, round=rnd,
                                       block_hash=fake),
                        Prevote.create(evil, ledger.origin, height=height, round=rnd,
                                       block_hash=None),
                        Precommit.create(evil, ledger.origin, height=height, round=rnd,
                                         block=block),
                        Precommit.create(evil, ledger.origin, height=height, round=rnd,
                                         block=None),
                    ]
                    attachment = json.dumps([m.to_json() for m in messages]).encode()
                    try:
                        _rpc(http, url, evil, "CONSENSUS", {"count": len(messages)}, address,
                             attachment)
                    except (httpx.HTTPError, ValueError):
                        pass
                    sent[0] += 1
            time.sleep(0.05)


def test_a_build_node_sending_conflicting_proposals_and_votes(
    tmp_path: Path, fresh_seeded_upstream: SeededUpstream
) -> None:
    up = fresh_seeded_upstream.url
    nodes: list[NodeProcess] = []
    stop = threading.Event()
    sent = [0]
    errors: list[str] = []
    attacker: threading.Thread | None = None
    try:
        a = NodeProcess(tmp_path / "a", upstream=up, extra=FAST).start()
        nodes.append(a)
        for name in "bcd":
            nodes.append(NodeProcess(tmp_path / name, upstream=up,
                                     extra=(*FAST, "--peer", a.url)).start())
        for i, peer in enumerate(nodes[1:]):
            out = run_cli(tmp_path, "authorize", "--peer", status(peer)["node_id"], "--data-dir",
                          str(a.data_dir), *(["--force"] if i < 2 else []), port=a.port,
                          timeout=120)
            assert out.returncode == 0, out.stderr
        for n in nodes:
            wait_until("4 build nodes", lambda n=n: len(status(n)["authorized_build_nodes"]) == 4)
        a, b, c, d = nodes
        evil = Ed25519Signer.from_pem((d.data_dir / "node.key").read_bytes())
        d_address = d.url
        d.stop()
        honest = [a, b, c]
        start_height = status(a)["ledger_height"]
        attacker = threading.Thread(target=equivocate, args=(
            [n.url for n in honest], evil, d_address, stop, sent, errors), daemon=True)
        attacker.start()
        try:
            wait_until("the attack to start", lambda: sent[0] >= 9, 30)
        except AssertionError:
            raise AssertionError(f"the attack did not start: {errors[-3:]}") from None
        # An honest build during the attack commits (3 of 4 build nodes are honest).
        out = run_cli(tmp_path, "build", "docker", "--image", "library/alpine:3.16.2", "--wait",
                      "120", port=b.port, timeout=180)
        assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
        stop.set()
        attacker.join(30)
        assert sent[0] >= 9
        height = status(b)["ledger_height"]
        assert height > start_height
        for n in honest:
            wait_until("the honest nodes to agree", lambda n=n: status(n)["ledger_height"]
                       >= height)
        heads = {status(n)["ledger_head"] for n in honest}
        assert len(heads) == 1, heads
        # The honest records, once; nothing of the equivocating node's blocks.
        with httpx.Client(base_url=a.url, timeout=30) as http:
            records = http.get("/api/inspect-log/docker",
                               params={"image": "alpine:3.16.2"}).json()
            assert {r["package_specific_artifact_id"] for r in records} >= {"alpine:3.16.2"}
            assert len(records) == len({r["id"] for r in records})
            for i in range(3):
                r = http.get("/api/inspect-log/docker", params={"image": f"evil{i}:1"})
                assert r.status_code == 404
        logs = [n.log() for n in honest]
        assert not any("Traceback" in log for log in logs)
        # The honest nodes saw the conflicting messages and set them aside.
        assert any(f"Consensus ignored a message from {evil.node_id[:16]}" in log
                   for log in logs)
    finally:
        stop.set()
        if attacker is not None:
            attacker.join(30)
        for n in nodes:
            n.stop()
