"""Deterministic simulation of Tendermint among build nodes (DESIGN §5, issue 5).

A seeded scheduler with a simulated clock runs n validators -- the real
:class:`~pyrsia_core.consensus.TendermintMachine` over real :class:`~pyrsia_core.Ledger`
objects -- on an in-memory network that drops, delays, duplicates and reorders
messages until the global stabilisation time (GST); after GST every message between
honest nodes arrives within ``delta``. Honest validators crash and restart from the
snapshot they persisted before each send. Up to f validators are Byzantine (this file,
never the core): they equivocate (different proposals and votes to different peers,
double votes), vote without regard to locks, send messages of future rounds, stay
silent, or propose blocks that fail the build check or whose root is wrong.

Every run checks:

* **safety** -- no two honest nodes commit different blocks at one height, every
  committed block passes the honest build check, every certificate is accepted by
  ``Ledger.append``, and no honest node ever signs two different messages for one
  (type, height, round), crashes included;
* **liveness** -- every honest node commits every height, and the deciding round is
  at most :func:`liveness_rounds` (n + 2) rounds after the honest nodes' round at GST.

``bench/sim_consensus.py`` imports :func:`run_seed` for long runs.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
from core_helpers import signer
from pyrsia_core.consensus import (
    FutureMessages,
    Message,
    Output,
    Precommit,
    Prevote,
    Proposal,
    SignatureCache,
    TendermintMachine,
    Timeouts,
)
from pyrsia_core.errors import PyrsiaError, SignatureError

from pyrsia_core import (
    Block,
    CommittedBlock,
    Ed25519Signer,
    Ledger,
    MerkleTree,
    Record,
    SignedRecord,
    ValidatorSet,
    block_checkpoint,
    leaf_hash,
    sign_checkpoint,
)

ORIGIN = "sim/net"
T0 = 1_700_000_000
START = float(T0 + 100)
#: Simulated seconds.
TIMEOUTS = Timeouts(
    propose=1.0,
    propose_delta=0.5,
    prevote=0.5,
    prevote_delta=0.5,
    precommit=0.5,
    precommit_delta=0.5,
    rebroadcast=1.5,
    poll=0.2,
)
DELTA = 0.2  # post-GST bound on honest message delay


def liveness_rounds(n: int) -> int:
    """After GST, a height is decided within this many rounds of the GST round.

    Within one rotation (n rounds) the honest validator with the highest valid round
    proposes its valid value with that round; every honest lock is no newer, and the
    proof of lock travels with the proposal, so every honest validator prevotes it.
    Two more rounds cover the honest validators getting into one round after GST.
    """
    return n + 2


RECORDS_PER_BLOCK = 2
MAX_SIM_TIME = 400.0  # after GST: a run still going by then is a liveness violation

SIGNERS: list[Ed25519Signer] = [signer(i + 1) for i in range(7)]
#: Shared by every machine of every run: each signature is verified once.
SIGNATURES = SignatureCache()
_RECORD_OK: set[bytes] = set()


def _verify_records_cached(records: Sequence[SignedRecord]) -> None:
    for sr in records:
        key = sr.signature + sr.record.canonical()
        if key not in _RECORD_OK:
            sr.verify()
            _RECORD_OK.add(key)


def _uuid(*parts: object) -> str:
    return str(uuid.UUID(bytes=hashlib.sha256(repr(parts).encode()).digest()[:16], version=4))


def _hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


_SIGNED: dict[tuple[Any, ...], SignedRecord] = {}


def _record(author: Ed25519Signer, height: int, k: int, *, good: bool) -> SignedRecord:
    """A deterministic AddArtifact record (good: the hash an honest rebuild gets)."""
    key = (author.node_id, height, k, good)
    sr = _SIGNED.get(key)
    if sr is None:
        artifact = _hash("good" if good else "tampered", height, author.node_id, k)
        r = Record(
            id=_uuid("id", *key),
            package_type="Docker",
            package_specific_id=f"img{height}:{k}",
            num_artifacts=RECORDS_PER_BLOCK,
            package_specific_artifact_id=f"img{height}@sha256:{artifact}",
            artifact_hash=artifact,
            source_hash="",
            artifact_id=_uuid("artifact", *key),
            source_id=_uuid("source", *key),
            timestamp=T0,
            operation="AddArtifact",
            node_id=author.node_id,
            node_public_key=author.public_key.hex,
        )
        sr = _SIGNED[key] = SignedRecord.sign(r, author)
    return sr


def good_hash(sr: SignedRecord) -> bool:
    """The honest build check: rebuilding gives the recorded hash."""
    r = sr.record
    height = int(r.package_specific_id[3:].split(":")[0])
    k = int(r.package_specific_id.split(":")[1])
    return r.artifact_hash == _hash("good", height, r.node_id, k)


_GENESIS: dict[int, tuple[CommittedBlock, list[bytes]]] = {}


def _genesis(n: int) -> tuple[CommittedBlock, list[bytes]]:
    """A deterministic genesis naming the first n signers (as ``make_genesis`` does)."""
    if n not in _GENESIS:
        signers = SIGNERS[:n]
        records = []
        for s in signers:
            r = Record(
                id=_uuid("genesis", s.node_id),
                package_type="Node",
                package_specific_id=s.node_id,
                num_artifacts=1,
                package_specific_artifact_id=s.public_key.hex,
                artifact_hash=s.node_id,
                source_hash="",
                artifact_id=_uuid("genesis-artifact", s.node_id),
                source_id=_uuid("genesis-source", s.node_id),
                timestamp=T0,
                operation="AddNode",
                node_id=s.node_id,
                node_public_key=s.public_key.hex,
            )
            records.append(SignedRecord.sign(r, s))
        leaves = [leaf_hash(sr.record.canonical()) for sr in records]
        tree = MerkleTree.from_leaves(leaves)
        block = Block(
            0, "0" * 64, T0, signers[0].node_id, records, tree.size, tree.root().hex(), ORIGIN
        )
        note = sign_checkpoint(
            block_checkpoint(ORIGIN, block), [(f"{ORIGIN}/{s.node_id}", s) for s in signers]
        )
        Ledger.start(CommittedBlock(block, note))  # it is a valid genesis
        _GENESIS[n] = (CommittedBlock(block, note), leaves)
    return _GENESIS[n]


def fresh_ledger(n: int) -> Ledger:
    genesis, leaves = _genesis(n)
    ledger = Ledger.restore(
        genesis=genesis.block,
        head=genesis.block,
        validators=ValidatorSet.of(s.public_key for s in SIGNERS[:n]),
        tree=MerkleTree.from_leaves(leaves),
    )
    ledger.record_verifier = _verify_records_cached
    return ledger


# -- configuration -------------------------------------------------------------------


@attrs.frozen
class SimConfig:
    seed: int
    n: int
    heights: int
    byzantine: tuple[str, ...]  # one mode per Byzantine validator (the last ones)
    gst: float
    drop: float
    dup: float
    max_delay: float
    crashes: tuple[tuple[int, float, float], ...]  # (node, down at, up at), before GST
    build_delay: float  # an honest rebuild takes this long (the check answers None)
    #: Before GST, nothing crosses between these nodes and the others (a partition).
    partition: frozenset[int] = frozenset()

    @property
    def f(self) -> int:
        return (self.n - 1) // 3


BYZANTINE_MODES = ("equivocate", "chaos", "invalid-build", "invalid-root", "silent")


def config_for_seed(seed: int, n: int | None = None) -> SimConfig:
    rng = random.Random(f"config-{seed}")
    if n is None:
        n = 4 if seed % 3 else 7
    f = (n - 1) // 3
    nbyz = rng.choice([0] + [f] * 3 + list(range(1, f + 1)))
    byz = tuple(rng.choice(BYZANTINE_MODES) for _ in range(nbyz))
    gst = rng.choice([0.0, rng.uniform(0, 8), rng.uniform(0, 25)])
    honest = list(range(n - nbyz))
    crashes = []
    if gst > 1 and rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            node = rng.choice(honest)
            down = rng.uniform(0, gst)
            up = min(gst, down + rng.uniform(0.2, 6))
            crashes.append((node, down, up))
    partition: frozenset[int] = frozenset()
    if gst > 1 and rng.random() < 0.25:
        partition = frozenset(rng.sample(range(n), rng.randint(1, n // 2)))
    return SimConfig(
        seed=seed,
        partition=partition,
        n=n,
        heights=rng.choice([2, 2, 3]),
        byzantine=byz,
        gst=gst,
        drop=rng.choice([0.0, 0.05, 0.2, 0.4]),
        dup=rng.choice([0.0, 0.05, 0.2]),
        max_delay=rng.choice([0.3, 1.0, 3.0]),
        crashes=tuple(crashes),
        build_delay=rng.choice([0.0, 0.0, 0.3, 1.5]),
    )


# -- nodes ---------------------------------------------------------------------------

Item = Message | CommittedBlock


@attrs.define(eq=False)
class Node:
    """An honest validator: its ledger, its machine for the current height, its store."""

    sim: Sim
    index: int
    signer: Ed25519Signer
    ledger: Ledger
    machine: TendermintMachine | None = None
    buffer: FutureMessages = attrs.Factory(FutureMessages)
    alive: bool = True
    #: Durable: survives crashes.
    snapshot: dict[str, Any] | None = None
    committed: dict[int, CommittedBlock] = attrs.Factory(dict)
    decided_round: dict[int, int] = attrs.Factory(dict)
    armed: float | None = None
    replied: dict[tuple[int, int], float] = attrs.Factory(dict)
    first_seen: dict[str, float] = attrs.Factory(dict)

    honest: bool = True

    node_id: str = ""

    def __attrs_post_init__(self) -> None:
        self.node_id = self.signer.node_id

    # -- behaviour hooks (Byzantine nodes override) --

    def get_value(self, now: float) -> Block | None:
        height = self.ledger.height + 1
        records = [_record(self.signer, height, k, good=True) for k in range(RECORDS_PER_BLOCK)]
        return self.ledger.propose(proposer=self.signer, records=records, timestamp=int(now))

    def build_check(self, block: Block) -> bool | None:
        if self.sim.cfg.build_delay:
            seen = self.first_seen.setdefault(block.hash, self.sim.now)
            if self.sim.now < seen + self.sim.cfg.build_delay:
                return None
        return all(good_hash(sr) for sr in block.records)

    def send_output(self, out: Output, now: float) -> None:
        for msg in out.broadcast:
            self.sim.broadcast(self.index, msg, now)

    # -- lifecycle --

    def boot(self, now: float) -> None:
        if self.machine is not None and self.honest:
            self.sim.evidence += len(self.machine.evidence)
        height = self.ledger.height + 1
        if height > self.sim.cfg.heights:
            self.machine = None
            return
        self.machine = TendermintMachine(
            self.ledger,
            self.signer,
            self.ledger.validators,
            ORIGIN,
            height,
            timeouts=TIMEOUTS,
            build_check=self.build_check,
            get_value=self.get_value,
            signature_cache=SIGNATURES,
        )
        if self.snapshot is not None and self.snapshot["height"] == height:
            self.machine.restore(self.snapshot)
            self.sim.restores += 1
        self.handle(self.machine.start(now), now)
        for msg in self.buffer.take(height):
            if self.machine is None or msg.height != self.machine.height:
                break
            self.handle(self.machine.receive(msg, now), now)

    def crash(self) -> None:
        if self.machine is not None:
            self.sim.evidence += len(self.machine.evidence)
        self.alive = False
        self.machine = None
        self.buffer = FutureMessages()
        self.armed = None

    def restart(self, now: float) -> None:
        self.alive = True
        self.boot(now)

    # -- I/O --

    def handle(self, out: Output, now: float) -> None:
        machine = self.machine
        if out.broadcast and machine is not None and self.honest:
            # Write-ahead: persist before anything leaves the node.
            self.snapshot = machine.snapshot()
        self.send_output(out, now)
        if out.committed is not None:
            assert machine is not None
            self.decided_round[out.committed.block.height] = machine.round
            self.apply(out.committed, now)
        self.arm()

    def arm(self) -> None:
        if self.machine is None or not self.alive:
            return
        deadline = self.machine.next_deadline()
        if deadline is not None and deadline != self.armed:
            self.armed = deadline
            self.sim.at(deadline, self.on_timer, deadline)

    def on_timer(self, now: float, deadline: float) -> None:
        if not self.alive or self.machine is None or deadline != self.armed:
            return
        self.armed = None
        self.handle(self.machine.handle_timer(now), now)

    def apply(self, committed: CommittedBlock, now: float) -> None:
        height = committed.block.height
        if height != self.ledger.height + 1:
            return
        try:
            self.ledger.append(committed, now=now)
        except PyrsiaError as exc:
            if self.honest:
                self.sim.violation(f"node {self.index}: Ledger.append refused a commit: {exc}")
            return
        self.committed[height] = committed
        self.snapshot = None
        if self.honest:
            self.sim.on_commit(self, committed, now)
        for dst in range(self.sim.cfg.n):  # announce it (the NEW_BLOCK gossip)
            self.sim.send(self.index, dst, committed, now)
        self.boot(now)

    def deliver(self, item: Item, src: int, now: float) -> None:
        if not self.alive:
            return
        if isinstance(item, CommittedBlock):
            self.apply(item, now)
            return
        if item.height <= self.ledger.height:
            # The sender is behind: give it the block (the runtime's sync), now and then.
            last = self.replied.get((src, item.height))
            if item.height in self.committed and (last is None or now - last > 1.0):
                self.replied[(src, item.height)] = now
                self.sim.send(self.index, src, self.committed[item.height], now)
            return
        if self.machine is None:
            return
        if item.height > self.machine.height:
            self.buffer.add(item, self.machine.height)
            return
        self.on_message(item, now)

    def on_message(self, msg: Message, now: float) -> None:
        assert self.machine is not None
        self.handle(self.machine.receive(msg, now), now)


@attrs.define(eq=False)
class ByzantineNode(Node):
    """A faulty validator (test-only): runs a machine to follow the protocol's rounds,
    then lies about what it does."""

    mode: str = "silent"
    honest: bool = False
    rng: random.Random = attrs.Factory(random.Random)
    blocks: dict[tuple[int, int], list[Block]] = attrs.Factory(dict)
    signed: dict[tuple[Any, ...], Message] = attrs.Factory(dict)
    alternatives: dict[str, Proposal] = attrs.Factory(dict)

    def get_value(self, now: float) -> Block | None:
        height = self.ledger.height + 1
        if self.mode == "invalid-build":
            records = [
                _record(self.signer, height, k, good=False) for k in range(RECORDS_PER_BLOCK)
            ]
            return self.ledger.propose(proposer=self.signer, records=records, timestamp=int(now))
        block = super().get_value(now)
        if block is not None and self.mode == "invalid-root":
            block = attrs.evolve(block, root=_hash("wrong root", now))
        return block

    def build_check(self, block: Block) -> bool | None:
        return True  # votes for anything the ledger accepts

    def on_message(self, msg: Message, now: float) -> None:
        if isinstance(msg, Proposal):
            self.blocks.setdefault((msg.height, msg.round), []).append(msg.block)
        super().on_message(msg, now)

    def _alternative(self, block: Block, now: float) -> Block:
        """Another block for the same height: same records, another timestamp."""
        return self.ledger.propose(
            proposer=self.signer, records=block.records, timestamp=block.timestamp + 1
        )

    def _variants(self, msg: Message, now: float) -> list[Message]:
        """The messages one recipient gets instead of ``msg``."""
        s, h, r = self.signer, msg.height, msg.round
        if isinstance(msg, Proposal):
            b = self.alternatives.get(msg.block_hash)
            if b is None or b.round != r:
                alt = self._alternative(msg.block, now)
                self.blocks.setdefault((h, r), []).append(alt)
                b = self.alternatives[msg.block_hash] = Proposal.create(
                    s, ORIGIN, height=h, round=r, block=alt
                )
            choice = self.rng.random()
            a = msg
            if choice < 0.4:
                return [a]
            if choice < 0.8:
                return [b]
            return [a, b] if self.rng.random() < 0.5 else [b, a]
        options: list[Block | None] = [None, *self.blocks.get((h, r), [])]
        picks = [self.rng.choice(options) for _ in range(1 + (self.rng.random() < 0.3))]
        return [self._vote(msg.TYPE, h, r, b) for b in picks]

    def _vote(self, kind: str, h: int, r: int, block: Block | None) -> Message:
        block_hash = None if block is None else block.hash
        key = (kind, h, r, block_hash)
        vote = self.signed.get(key)
        if vote is None:
            s = self.signer
            if kind == Prevote.TYPE:
                vote = Prevote.create(s, ORIGIN, height=h, round=r, block_hash=block_hash)
            else:
                vote = Precommit.create(s, ORIGIN, height=h, round=r, block=block)
            self.signed[key] = vote
        return vote

    def send_output(self, out: Output, now: float) -> None:
        if self.mode == "silent":
            return
        if self.mode in ("invalid-build", "invalid-root"):
            super().send_output(out, now)
            return
        for msg in out.broadcast:
            own = msg.sender == self.node_id
            for dst in range(self.sim.cfg.n):
                if dst == self.index:
                    continue
                if not own:
                    if self.rng.random() < 0.5:
                        self.sim.send(self.index, dst, msg, now)
                    continue
                for m in self._variants(msg, now):
                    self.sim.send(self.index, dst, m, now)
        if self.mode == "chaos" and self.machine is not None and self.rng.random() < 0.3:
            # Messages of a future round, to try to drag the honest nodes along.
            r = self.machine.round + self.rng.randint(1, 3)
            vote = Prevote.create(
                self.signer, ORIGIN, height=self.machine.height, round=r, block_hash=None
            )
            self.sim.send(self.index, self.rng.randrange(self.sim.cfg.n), vote, now)


# -- the simulation -------------------------------------------------------------------


@attrs.define
class SimResult:
    config: SimConfig
    violations: list[str]
    #: Per height: the highest round an honest node decided in.
    decided_rounds: dict[int, int]
    #: Per height: decided round minus the honest nodes' round at GST (0 after GST).
    rounds_after_gst: dict[int, int]
    sim_time: float
    events: int
    messages: int
    wall: float
    #: Restarts that resumed from a persisted snapshot of the current height.
    restores: int
    #: Equivocations honest machines recorded.
    evidence: int
    #: Simulated seconds from GST until every honest node had every height (or None).
    after_gst: float | None


@attrs.define(eq=False)
class Sim:
    cfg: SimConfig
    rng: random.Random = attrs.field(init=False)
    now: float = START
    queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = attrs.Factory(list)
    seq: int = 0
    nodes: list[Node] = attrs.Factory(list)
    violations: list[str] = attrs.Factory(list)
    commits: dict[int, str] = attrs.Factory(dict)
    honest_signed: dict[tuple[str, int, int, str], bytes] = attrs.Factory(dict)
    gst_round: dict[int, int] = attrs.Factory(dict)
    honest_index: dict[str, int] = attrs.Factory(dict)
    finished: set[int] = attrs.Factory(set)
    events: int = 0
    messages: int = 0
    restores: int = 0
    evidence: int = 0
    all_done_at: float | None = None

    def __attrs_post_init__(self) -> None:
        self.rng = random.Random(self.cfg.seed)
        cfg = self.cfg
        first_byz = cfg.n - len(cfg.byzantine)
        for i in range(cfg.n):
            ledger = fresh_ledger(cfg.n)
            node: Node
            if i < first_byz:
                node = Node(self, i, SIGNERS[i], ledger)
            else:
                node = ByzantineNode(
                    self,
                    i,
                    SIGNERS[i],
                    ledger,
                    mode=cfg.byzantine[i - first_byz],
                    rng=random.Random(f"{cfg.seed}-byz-{i}"),
                )
            self.nodes.append(node)
            if node.honest:
                self.honest_index[node.node_id] = i

    @property
    def gst(self) -> float:
        return START + self.cfg.gst

    def honest_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.honest]

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, fn, args))

    def violation(self, text: str) -> None:
        self.violations.append(f"seed {self.cfg.seed} t={self.now - START:.2f}: {text}")

    # -- network --

    def broadcast(self, src: int, msg: Message, now: float) -> None:
        self.check_honest_signature(msg)
        for dst in range(self.cfg.n):
            if dst != src:
                self.send(src, dst, msg, now)

    def send(self, src: int, dst: int, item: Item, now: float) -> None:
        if src == dst:
            return
        self.messages += 1
        sender, receiver = self.nodes[src], self.nodes[dst]
        if isinstance(item, Message):
            self.check_honest_signature(item)
        stable = now >= self.gst and sender.honest and receiver.honest
        copies = 1 + (self.rng.random() < self.cfg.dup)
        for _ in range(copies):
            if stable:
                delay = self.rng.uniform(0.002, DELTA)
            else:
                if self.rng.random() < self.cfg.drop:
                    continue
                if (src in self.cfg.partition) != (dst in self.cfg.partition):
                    continue
                delay = self.rng.uniform(0.0, self.cfg.max_delay)
                if self.rng.random() < 0.05:
                    delay += self.rng.uniform(0, 10)  # a straggler
            self.at(now + delay, self._deliver, dst, item, src)

    def _deliver(self, now: float, dst: int, item: Item, src: int) -> None:
        self.nodes[dst].deliver(item, src, now)

    def check_honest_signature(self, msg: Message) -> None:
        """No honest validator ever signs two different messages for one slot."""
        index = self.honest_index.get(msg.sender)
        if index is None:
            return
        key = (msg.TYPE, msg.height, msg.round, msg.sender)
        sig = msg.signature_bytes
        previous = self.honest_signed.setdefault(key, sig)
        if previous != sig:
            self.violation(f"honest node {index} equivocated: two {key[0]}s, h={key[1]} r={key[2]}")

    # -- bookkeeping --

    def on_commit(self, node: Node, committed: CommittedBlock, now: float) -> None:
        block = committed.block
        previous = self.commits.setdefault(block.height, block.hash)
        if previous != block.hash:
            self.violation(
                f"SAFETY: node {node.index} committed {block.hash[:12]} at height"
                f" {block.height}, another honest node committed {previous[:12]}"
            )
        if not all(good_hash(sr) for sr in block.records):
            self.violation(f"node {node.index} committed a block that fails the build check")
        if len(node.committed) >= self.cfg.heights:
            self.finished.add(node.index)
            if self.done():
                self.all_done_at = now

    def mark_gst(self, now: float) -> None:
        for node in self.honest_nodes():
            if node.machine is not None:
                h = node.machine.height
                self.gst_round[h] = max(self.gst_round.get(h, 0), node.machine.round)

    def done(self) -> bool:
        return len(self.finished) == len(self.honest_index)

    def run(self) -> SimResult:
        started = time.perf_counter()
        cfg = self.cfg
        for node in self.nodes:
            self.at(START + self.rng.uniform(0, 0.05), lambda now, nd=node: nd.boot(now))
        for index, down, up in cfg.crashes:
            node = self.nodes[index]
            self.at(START + down, lambda now, nd=node: nd.crash())
            self.at(START + up, lambda now, nd=node: nd.restart(now) if not nd.alive else None)
        self.at(self.gst, self.mark_gst)
        limit = self.gst + MAX_SIM_TIME
        while self.queue and not self.done():
            t, _, fn, args = heapq.heappop(self.queue)
            if t > limit:
                break
            self.now = t
            self.events += 1
            fn(t, *args)
        if not self.done():
            missing = {
                n.index: sorted(set(range(1, cfg.heights + 1)) - set(n.committed))
                for n in self.honest_nodes()
                if len(n.committed) < cfg.heights
            }
            self.violation(f"LIVENESS: honest nodes never committed {missing}")
        decided: dict[int, int] = {}
        for node in self.honest_nodes():
            for h, r in node.decided_round.items():
                decided[h] = max(decided.get(h, 0), r)
        after = {h: max(0, r - self.gst_round.get(h, 0)) for h, r in decided.items()}
        for h, extra in after.items():
            if extra > liveness_rounds(cfg.n):
                self.violation(f"LIVENESS: height {h} took {extra} rounds after GST")
        return SimResult(
            config=cfg,
            violations=self.violations,
            decided_rounds=decided,
            rounds_after_gst=after,
            sim_time=self.now - START,
            events=self.events,
            messages=self.messages,
            wall=time.perf_counter() - started,
            restores=self.restores,
            evidence=self.evidence
            + sum(len(n.machine.evidence) for n in self.honest_nodes() if n.machine is not None),
            after_gst=None if self.all_done_at is None else max(0.0, self.all_done_at - self.gst),
        )


def run_seed(seed: int, n: int | None = None) -> SimResult:
    return Sim(config_for_seed(seed, n)).run()


# -- tests ------------------------------------------------------------------------------

#: Seeds run by ``test_safety_and_liveness`` (n = 4 and n = 7).
SEEDS_N4 = range(0, 1500)
SEEDS_N7 = range(0, 600)


def _check(results: list[SimResult]) -> None:
    violations = [v for r in results for v in r.violations]
    assert not violations, f"{len(violations)} violations:\n" + "\n".join(violations[:20])


def _chunks(seeds: range, parts: int) -> list[range]:
    step = -(-len(seeds) // parts)
    return [range(a, min(a + step, seeds.stop)) for a in range(seeds.start, seeds.stop, step)]


@pytest.mark.parametrize(
    ("n", "seeds"),
    [(4, r) for r in _chunks(SEEDS_N4, 3)] + [(7, r) for r in _chunks(SEEDS_N7, 3)],
    ids=lambda v: str(v) if isinstance(v, int) else f"seeds{v.start}-{v.stop - 1}",
)
def test_safety_and_liveness(n: int, seeds: range) -> None:
    results = [run_seed(s, n) for s in seeds]
    _check(results)
    configs = [r.config for r in results]
    # The runs really cover what they claim to.
    assert sum(1 for c in configs if c.byzantine) > len(configs) // 2
    assert sum(1 for c in configs if len(c.byzantine) == c.f) > len(configs) // 4
    assert {m for c in configs for m in c.byzantine} == set(BYZANTINE_MODES)
    assert sum(r.restores for r in results) > 0
    assert sum(1 for c in configs if c.partition) > 0
    assert sum(r.evidence for r in results) > 0  # the equivocators were caught at it
    assert all(r.after_gst is not None for r in results)


def test_honest_network_commits_in_round_zero() -> None:
    for seed in range(20):
        cfg = attrs.evolve(
            config_for_seed(seed),
            byzantine=(),
            gst=0.0,
            drop=0.0,
            dup=0.0,
            crashes=(),
            build_delay=0.0,
            partition=frozenset(),
        )
        result = Sim(cfg).run()
        _check([result])
        assert set(result.decided_rounds.values()) == {0}, result.decided_rounds


def test_a_tampering_builder_never_gets_its_block_committed() -> None:
    # The scenario: 1 of 4 build nodes proposes hashes the others cannot rebuild.
    results = []
    for seed in range(30):
        cfg = attrs.evolve(config_for_seed(seed, 4), byzantine=("invalid-build",))
        results.append(Sim(cfg).run())
    _check(results)  # includes "committed a block that fails the build check"


def test_f_plus_one_silent_validators_stop_progress_but_not_safety() -> None:
    # n = 4 with 2 silent: no quorum, so nothing commits (and nothing wrong is committed).
    cfg = attrs.evolve(
        config_for_seed(7, 4),
        byzantine=("silent", "silent"),
        gst=0.0,
        crashes=(),
        partition=frozenset(),
    )
    sim = Sim(cfg)
    result = sim.run()
    assert all(not n.committed for n in sim.honest_nodes())
    assert [v for v in result.violations if "LIVENESS" not in v] == []


def test_simulation_is_deterministic() -> None:
    a, b = run_seed(12345, 7), run_seed(12345, 7)
    assert (a.events, a.messages, a.decided_rounds, a.sim_time) == (
        b.events,
        b.messages,
        b.decided_rounds,
        b.sim_time,
    )


def test_the_checks_catch_a_machine_with_a_short_quorum(monkeypatch: pytest.MonkeyPatch) -> None:
    # Guard against vacuous checks: with f+1 instead of 2f+1, equivocators split the
    # honest nodes, and the checks must say so.
    import pyrsia_core._consensus as core

    original = core.TendermintMachine.__attrs_post_init__

    def short_quorum(self: TendermintMachine) -> None:
        original(self)
        self._quorum = self._skip

    monkeypatch.setattr(core.TendermintMachine, "__attrs_post_init__", short_quorum)
    results = [run_seed(seed, 4) for seed in range(10)]
    assert sum(1 for r in results if r.violations) >= 5


def test_the_checks_catch_a_restart_that_forgets_its_votes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = Node.boot

    def forgetful(self: Node, now: float) -> None:
        self.snapshot = None
        original(self, now)

    monkeypatch.setattr(Node, "boot", forgetful)
    found = [run_seed(seed, 4) for seed in range(60)]
    assert any(any("equivocated" in v for v in r.violations) for r in found)


def test_signature_cache_remembers_only_successes() -> None:
    cache = SignatureCache()
    s = SIGNERS[0]
    sig = s.sign(b"payload")
    assert cache.verify(s.public_key, sig, b"payload")
    assert cache.verify(s.public_key, sig, b"payload")
    assert not cache.verify(s.public_key, sig, b"other")
    assert not cache.verify(SIGNERS[1].public_key, sig, b"payload")
    assert not cache.verify(s.public_key, b"short", b"payload")
    with pytest.raises(SignatureError):
        s.verifier().verify(sig, b"other")
