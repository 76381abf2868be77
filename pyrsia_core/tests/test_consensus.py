"""Unit tests of the Tendermint machine (pyrsia_core.consensus): Algorithm 1 rule by rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import pytest
from core_helpers import artifact_records, genesis, signer
from pyrsia_core.consensus import (
    MAX_PROPOSAL_BYTES,
    MAX_VOTE_BYTES,
    STEP_TRANSITIONS,
    TIMEOUT_RULES,
    UPON_RULES,
    ConsensusError,
    FutureMessages,
    Message,
    MessageError,
    Output,
    Precommit,
    Prevote,
    Proposal,
    Step,
    TendermintMachine,
    TimeoutKind,
    Timeouts,
    Trigger,
    message_from_bytes,
    message_from_json,
    proposer_of,
)
from pyrsia_core.errors import BlockError

from pyrsia_core import (
    Block,
    CommittedBlock,
    Ed25519Signer,
    Ledger,
    SignedNote,
    block_checkpoint,
    canonical_json,
    canonical_loads,
    open_checkpoint,
    sign_note,
)

ORIGIN = "test/net"
NOW = 1_700_000_200.0
TIMEOUTS = Timeouts(
    propose=1.0,
    propose_delta=0.5,
    prevote=0.5,
    prevote_delta=0.25,
    precommit=0.5,
    precommit_delta=0.25,
    rebroadcast=5.0,
    poll=0.1,
)
SIGNERS = [signer(i + 1) for i in range(7)]
OUTSIDER = signer(99)


def _value(ledger: Ledger, s: Ed25519Signer, n: int = 2) -> Callable[[float], Block]:
    records = artifact_records(s, n)
    return lambda now: ledger.propose(proposer=s, records=records, timestamp=int(now))


@attrs.define
class Net:
    """n validators on a perfect network; messages are delivered in send order."""

    signers: list[Ed25519Signer]
    genesis: CommittedBlock
    ledgers: list[Ledger]
    machines: list[TendermintMachine]
    committed: dict[int, CommittedBlock] = attrs.Factory(dict)
    ignored: list[tuple[int, Message | None, str]] = attrs.Factory(list)

    @classmethod
    def make(
        cls,
        n: int,
        *,
        build_check: Callable[[int, Block], bool | None] | None = None,
        get_value: Callable[[int, Ledger, Ed25519Signer], Callable[[float], Block | None]]
        | None = None,
        height: int = 1,
    ) -> Net:
        signers = SIGNERS[:n]
        g = genesis(signers, ORIGIN)
        ledgers = [Ledger.start(g) for _ in signers]
        machines = []

        def check_of(i: int) -> Callable[[Block], bool | None]:
            if build_check is None:
                return _yes
            return lambda block: build_check(i, block)

        for i, (s, ledger) in enumerate(zip(signers, ledgers, strict=True)):
            machines.append(
                TendermintMachine(
                    ledger,
                    s,
                    ledger.validators,
                    ORIGIN,
                    height,
                    timeouts=TIMEOUTS,
                    build_check=check_of(i),
                    get_value=get_value(i, ledger, s) if get_value else _value(ledger, s),
                )
            )
        return cls(signers, g, ledgers, machines)

    def index_of(self, node_id: str) -> int:
        return [s.node_id for s in self.signers].index(node_id)

    def run(
        self,
        outputs: Sequence[tuple[int, Output]],
        now: float,
        drop: Callable[[int, int, Message], bool] = lambda src, dst, m: False,
    ) -> None:
        queue = [(i, m) for i, out in outputs for m in out.broadcast]
        for i, out in outputs:
            self._note(i, out)
        while queue:
            src, msg = queue.pop(0)
            for dst, machine in enumerate(self.machines):
                if dst == src or drop(src, dst, msg):
                    continue
                out = machine.receive(msg, now)
                self._note(dst, out)
                queue.extend((dst, m) for m in out.broadcast)

    def _note(self, i: int, out: Output) -> None:
        if out.committed is not None:
            self.committed[i] = out.committed
        self.ignored.extend((i, m, r) for m, r in out.ignored)

    def start(self, now: float = NOW) -> None:
        self.run([(i, m.start(now)) for i, m in enumerate(self.machines)], now)

    def fire_timers(self, now: float) -> None:
        self.run([(i, m.handle_timer(now)) for i, m in enumerate(self.machines)], now)


def _yes(block: Block) -> bool:
    return True


# -- commits ---------------------------------------------------------------------------


def test_a_single_validator_commits_at_once() -> None:
    net = Net.make(1)
    out = net.machines[0].start(NOW)
    assert out.committed is not None
    assert net.machines[0].step is Step.DECIDED
    assert net.machines[0].next_deadline() is None
    assert [type(m) for m in out.broadcast] == [Proposal, Prevote, Precommit]
    net.ledgers[0].append(out.committed, now=NOW)
    assert net.ledgers[0].height == 1


def test_four_validators_commit_in_round_zero_and_the_certificate_validates() -> None:
    net = Net.make(4)
    net.start()
    assert sorted(net.committed) == [0, 1, 2, 3]
    blocks = {c.block.hash for c in net.committed.values()}
    assert len(blocks) == 1
    assert all(m.round == 0 for m in net.machines)
    proposer = net.index_of(proposer_of(net.ledgers[0].validators, 1, 0))
    block = net.committed[0].block
    assert block.proposer == net.signers[proposer].node_id
    for i, committed in net.committed.items():
        assert len(committed.certificate.signatures) >= 3
        assert committed.certificate.text == block_checkpoint(ORIGIN, block).to_text()
        net.ledgers[i].append(committed, now=NOW)  # the ledger's own quorum check
        assert net.ledgers[i].head_hash == block.hash
    # An offline verifier checks it with the validator keys alone.
    cp, names = open_checkpoint(
        net.committed[0].certificate.to_text(),
        Ledger.start(net.genesis).validators.verifiers(ORIGIN),
        3,
        origin=ORIGIN,
    )
    assert cp.size == block.tree_size and len(names) >= 3
    # And the certificate survives its wire form.
    again = CommittedBlock.from_bytes(net.committed[0].to_bytes())
    fresh = Ledger.start(net.genesis)
    fresh.append(again, now=NOW)


def test_seven_validators_commit_with_two_silent() -> None:
    net = Net.make(7)
    silent = {5, 6}
    outputs = [(i, m.start(NOW)) for i, m in enumerate(net.machines) if i not in silent]
    now = NOW
    net.run(outputs, now, drop=lambda s, d, m: s in silent or d in silent)
    for _ in range(40):
        if len(net.committed) == 5:
            break
        deadlines = [m.next_deadline() for i, m in enumerate(net.machines) if i not in silent]
        now = min(d for d in deadlines if d is not None)
        outs = [(i, m.handle_timer(now)) for i, m in enumerate(net.machines) if i not in silent]
        net.run(outs, now, drop=lambda s, d, m: s in silent or d in silent)
    assert sorted(net.committed) == [0, 1, 2, 3, 4]
    assert len({c.block.hash for c in net.committed.values()}) == 1
    for c in net.committed.values():
        net.ledgers[0].validate(c, now=now)


def test_a_certificate_short_of_the_quorum_is_refused_by_the_ledger() -> None:
    net = Net.make(4)
    net.start()
    committed = net.committed[0]
    short = CommittedBlock(
        committed.block,
        SignedNote(committed.certificate.text, committed.certificate.signatures[:2]),
    )
    with pytest.raises(BlockError, match="quorum"):
        net.ledgers[0].append(short, now=NOW)


# -- bad input ----------------------------------------------------------------------------


def _prevote(s: Ed25519Signer, round: int, block_hash: str | None, height: int = 1) -> Prevote:
    return Prevote.create(s, ORIGIN, height=height, round=round, block_hash=block_hash)


def _precommit(s: Ed25519Signer, round: int, block: Block | None, height: int = 1) -> Precommit:
    return Precommit.create(s, ORIGIN, height=height, round=round, block=block)


def _proposal(s: Ed25519Signer, round: int, block: Block, vr: int = -1) -> Proposal:
    return Proposal.create(s, ORIGIN, height=block.height, round=round, block=block, valid_round=vr)


def _sent(out: Output) -> list[tuple[type, str | None]]:
    return [(type(x), getattr(x, "block_hash", None)) for x in out.broadcast]


def _own(m: TendermintMachine, out: Output) -> list[tuple[type, str | None]]:
    """What ``m`` itself signed in ``out`` (it also relays others' messages)."""
    return [
        (type(x), getattr(x, "block_hash", None)) for x in out.broadcast if x.sender == m.node_id
    ]


def _state(m: TendermintMachine) -> tuple[object, ...]:
    return (m.round, m.step, m.locked_round, m.valid_round, m.next_deadline(), len(m.evidence))


def test_bad_messages_are_ignored_with_a_reason() -> None:
    net = Net.make(4)
    x = net.machines[0]
    x.start(NOW)
    ledger = net.ledgers[0]
    p0 = net.index_of(x.proposer(0))
    not_proposer = next(i for i in range(4) if i != p0)
    block = ledger.propose(
        proposer=net.signers[p0], records=artifact_records(net.signers[p0], 1), timestamp=int(NOW)
    )
    good = _prevote(net.signers[1], 0, None)
    forged = attrs.evolve(good, signature=bytes(64))
    other_net = Prevote.create(net.signers[1], "other/net", height=1, round=0, block_hash=None)
    outsider = Prevote(1, 0, None, OUTSIDER.node_id).signed(OUTSIDER, ORIGIN)
    wrong_root = attrs.evolve(block, root="ab" * 32)
    bad_note = Precommit(
        1,
        0,
        block.hash,
        net.signers[2].node_id,
        b"",
        sign_note("not the checkpoint\n", net.signers[2], f"{ORIGIN}/{net.signers[2].node_id}"),
    ).signed(net.signers[2], ORIGIN)
    wrong_key = Precommit(
        1,
        0,
        block.hash,
        net.signers[3].node_id,
        b"",
        sign_note(
            block_checkpoint(ORIGIN, block).to_text(),
            net.signers[3],
            f"{ORIGIN}/{net.signers[1].node_id}",
        ),
    ).signed(net.signers[3], ORIGIN)
    cases: list[tuple[Message, str]] = [
        (forged, "bad signature"),
        (other_net, "bad signature"),
        (outsider, "not a validator"),
        (_prevote(net.signers[1], 0, None, height=2), "wrong height"),
        (_prevote(net.signers[1], 0, None, height=0), "wrong height"),
        (_proposal(net.signers[not_proposer], 0, block), "not the proposer"),
        (_proposal(net.signers[p0], 0, wrong_root), "root does not match"),
        (wrong_key, "not under the voter's note key"),
    ]
    # A note signature over something else is caught once the block is known.
    x.receive(_proposal(net.signers[p0], 0, block), NOW)
    cases.append((bad_note, "does not verify"))
    before = _state(x)
    for msg, reason in cases:
        out = x.receive(msg, NOW)
        assert out.broadcast == [] and out.committed is None
        assert len(out.ignored) == 1 and out.ignored[0][0] is msg
        assert reason in out.ignored[0][1], (reason, out.ignored[0][1])
    assert _state(x) == before
    # A message seen before is a duplicate.
    x.receive(good, NOW)
    assert x.receive(good, NOW).ignored == [(good, "duplicate")]


def test_oversized_and_malformed_input_is_ignored() -> None:
    net = Net.make(4)
    x = net.machines[0]
    x.max_block_records = 3
    x.start(NOW)
    p0 = net.index_of(x.proposer(0))
    big = net.ledgers[0].propose(
        proposer=net.signers[p0], records=artifact_records(net.signers[p0], 4), timestamp=int(NOW)
    )
    out = x.receive(_proposal(net.signers[p0], 0, big), NOW)
    assert "oversized" in out.ignored[0][1]
    # Bytes: over the proposal cap, a vote over the vote cap, junk, a non-canonical form.
    assert "exceeds" in x.receive_bytes(b" " * (MAX_PROPOSAL_BYTES + 1), NOW).ignored[0][1]
    vote = _prevote(net.signers[1], 0, None).to_json()
    vote["voter"] = vote["voter"] + " " * MAX_VOTE_BYTES
    padded = canonical_json(vote)
    assert len(padded) > MAX_VOTE_BYTES
    assert x.receive_bytes(padded, NOW).ignored[0][0] is None
    assert "malformed" in x.receive_bytes(b"\xff\x00", NOW).ignored[0][1]
    assert "malformed" in x.receive_bytes(b'{"type": "prevote"}', NOW).ignored[0][1]
    assert x.receive(object(), NOW).ignored[0][1] == "not a consensus message"  # type: ignore[arg-type]
    # A well-formed one through bytes is accepted.
    ok = x.receive_bytes(_prevote(net.signers[1], 0, None).to_bytes(), NOW)
    assert ok.ignored == []


def test_messages_round_trip_and_parsing_is_strict() -> None:
    net = Net.make(4)
    s = net.signers[1]
    block = net.ledgers[0].propose(proposer=s, records=artifact_records(s, 2), timestamp=int(NOW))
    messages: list[Message] = [
        _proposal(s, 3, block, vr=1),
        _prevote(s, 2, block.hash),
        _prevote(s, 2, None),
        _precommit(s, 5, block),
        _precommit(s, 5, None),
    ]
    for m in messages:
        assert message_from_bytes(m.to_bytes()) == m
        assert Message.from_bytes(m.to_bytes()) == m
        assert type(m).from_json(m.to_json()) == m
        assert message_from_json(canonical_loads(canonical_json(m.to_json()))) == m
        assert len(m.signature_bytes) == 64
    bad: list[dict[str, object]] = []
    j = messages[1].to_json()
    bad.append({**j, "extra": 1})
    bad.append({k: v for k, v in j.items() if k != "voter"})
    bad.append({**j, "round": -1})
    bad.append({**j, "round": True})
    bad.append({**j, "block_hash": "AB" * 32})
    bad.append({**j, "signature": "00"})
    bad.append({**j, "type": "commit"})
    p = messages[0].to_json()
    bad.append({**p, "valid_round": 3})  # not below the round
    bad.append({**p, "height": 2})  # block of another height
    c = messages[4].to_json()
    bad.append({**c, "checkpoint_signature": messages[3].to_json()["checkpoint_signature"]})
    bad.append({**messages[3].to_json(), "checkpoint_signature": None})
    for data in bad:
        with pytest.raises(MessageError):
            message_from_json(data)
    with pytest.raises(MessageError):
        message_from_bytes(b"[]")
    with pytest.raises(MessageError, match="expected a precommit"):
        Precommit.from_json(messages[1].to_json())


# -- validity and the build check -----------------------------------------------------------


def test_a_proposal_failing_the_build_check_gets_nil_prevotes_and_does_not_commit() -> None:
    # Every honest node's rebuild disagrees with the round-0 proposer's hashes.
    bad_proposer: list[str] = []

    def build_check(i: int, block: Block) -> bool:
        return block.proposer not in bad_proposer

    net = Net.make(4, build_check=build_check)
    p0 = net.machines[0].proposer(0)
    bad_proposer.append(p0)
    net.start()
    assert net.committed == {}
    for m in net.machines:
        log = m.snapshot()["sent"]
        prevotes = [v for v in log if v["type"] == "prevote" and v["round"] == 0]
        assert len(prevotes) == 1
        voter = prevotes[0]["voter"]
        if voter != p0:
            assert prevotes[0]["block_hash"] is None
    # The round fails; with timeouts, round 1's proposer (whose rebuild agrees) commits.
    now = NOW
    for _ in range(10):
        now = min(d for d in (m.next_deadline() for m in net.machines) if d is not None)
        net.fire_timers(now)
        if len(net.committed) == 4:
            break
    assert len(net.committed) == 4
    (block,) = {c.block for c in net.committed.values()}
    assert block.proposer != p0
    assert {m.decision.block.hash for m in net.machines if m.decision} == {block.hash}


def test_a_pending_build_check_waits_then_votes() -> None:
    answers: dict[int, bool | None] = {i: None for i in range(4)}
    net = Net.make(4, build_check=lambda i, b: answers[i])
    net.start()
    assert net.committed == {}
    assert all(m.step is Step.PROPOSE for m in net.machines)
    # The machines ask again on their poll deadline.
    assert all(m.next_deadline() == NOW + TIMEOUTS.poll for m in net.machines)
    for i in answers:
        answers[i] = True
    net.fire_timers(NOW + TIMEOUTS.poll)
    assert len(net.committed) == 4
    assert all(m.round == 0 for m in net.machines)


def test_a_build_check_that_raises_counts_as_a_no() -> None:
    def boom(i: int, block: Block) -> bool:
        raise RuntimeError("upstream down")

    net = Net.make(1, build_check=boom)
    out = net.machines[0].start(NOW)
    assert out.committed is None
    assert [m.block_hash for m in out.broadcast if isinstance(m, Prevote)] == [None]


def test_a_ledger_invalid_proposal_gets_a_nil_prevote() -> None:
    net = Net.make(4)
    x = net.machines[0]
    x.start(NOW)
    p0 = net.index_of(x.proposer(0))
    s = net.signers[p0]
    stale = attrs.evolve(
        net.ledgers[0].propose(proposer=s, records=artifact_records(s, 1), timestamp=int(NOW)),
        parent="00" * 32,
    )
    out = x.receive(_proposal(s, 0, stale), NOW)
    assert out.ignored == []
    assert _sent(out) == [(Prevote, None)]


def test_a_proposer_without_a_value_proposes_nothing_and_the_round_times_out() -> None:
    net = Net.make(4, get_value=lambda i, ledger, s: lambda now: None)
    net.start()
    assert all(m.step is Step.PROPOSE for m in net.machines)
    proposer = net.machines[net.index_of(net.machines[0].proposer(0))]
    assert proposer.next_deadline() == NOW + TIMEOUTS.poll  # it asks again for a value
    net.fire_timers(NOW + TIMEOUTS.propose)
    assert all(m.step is Step.PRECOMMIT for m in net.machines)  # nil, nil
    net.fire_timers(NOW + TIMEOUTS.propose + TIMEOUTS.precommit)
    assert all(m.round == 1 and m.step is Step.PROPOSE for m in net.machines)


# -- locks ------------------------------------------------------------------------------------


@attrs.define
class Locked:
    """Machine ``x`` of 4, locked on ``b`` in round 0; the others are played by the test."""

    net: Net
    x: TendermintMachine
    others: list[Ed25519Signer]
    b: Block
    b2: Block
    now: float

    def proposer(self, round: int) -> Ed25519Signer:
        return self.net.signers[self.net.index_of(self.x.proposer(round))]

    def feed(self, *messages: Message) -> Output:
        broadcast: list[Message] = []
        for m in messages:
            out = self.x.receive(m, self.now)
            assert out.ignored == [], out.ignored
            broadcast += out.broadcast
        return Output(broadcast)

    def expire(self) -> Output:
        deadline = self.x.next_deadline()
        assert deadline is not None
        self.now = deadline
        return self.x.handle_timer(deadline)

    def to_round(self, round: int) -> None:
        """Leave the current round with nil prevotes/precommits from the others."""
        while self.x.round < round:
            r = self.x.round
            if self.x.step is Step.PROPOSE:
                self.expire()  # OnTimeoutPropose: prevote nil
            self.feed(*(_prevote(s, r, None) for s in self.others[:2]))
            if self.x.step is Step.PREVOTE:
                self.expire()
            self.feed(*(_precommit(s, r, None) for s in self.others[:2]))
            while self.x.round == r:
                self.expire()


def _locked() -> Locked:
    net = Net.make(4)
    ordered = net.ledgers[0].validators.ordered()
    # x proposes round 3, so rounds 0-2 are proposed by the others.
    x_id = proposer_of(net.ledgers[0].validators, 1, 3)
    xi = net.index_of(x_id)
    x = net.machines[xi]
    others = [net.signers[net.index_of(v)] for v in ordered if v != x_id]
    x.start(NOW)
    p0 = net.signers[net.index_of(x.proposer(0))]
    p1 = net.signers[net.index_of(x.proposer(1))]
    b = net.ledgers[0].propose(proposer=p0, records=artifact_records(p0, 2), timestamp=int(NOW))
    b2 = net.ledgers[0].propose(proposer=p1, records=artifact_records(p1, 1), timestamp=int(NOW))
    t = Locked(net, x, others, b, b2, NOW)
    out = t.feed(_proposal(p0, 0, b))
    assert _sent(out) == [(Prevote, b.hash)]
    helper = next(s for s in others if s is not p0)
    out = t.feed(_prevote(helper, 0, b.hash), _prevote(p0, 0, b.hash))
    assert x.locked_round == 0 and x.locked_block == b
    assert _own(x, out) == [(Precommit, b.hash)]
    # ... and it relays the proof of lock it saw (gossip), its own prevote aside.
    relayed = {m.sender for m in out.broadcast if isinstance(m, Prevote)}
    assert relayed == {helper.node_id, p0.node_id}
    # Nobody else precommits b: the round ends without a decision.
    t.feed(*(_precommit(s, 0, None) for s in others[:2]))
    while x.round == 0:
        t.expire()
    assert x.decision is None
    return t


def test_a_locked_validator_prevotes_nil_for_another_fresh_block() -> None:
    t = _locked()
    assert t.x.round == 1
    out = t.feed(_proposal(t.proposer(1), 1, t.b2))
    assert _sent(out) == [(Prevote, None)]
    assert t.x.locked_block == t.b


def test_a_locked_validator_prevotes_its_locked_block_again() -> None:
    t = _locked()
    out = t.feed(_proposal(t.proposer(1), 1, t.b, vr=-1))
    assert _sent(out) == [(Prevote, t.b.hash)]


def test_a_newer_proof_of_lock_releases_the_lock() -> None:
    t = _locked()
    # Round 1: the others prevote b2 (x never sees round 1's proposal, so cannot lock).
    t.expire()  # no proposal: prevote nil
    t.feed(*(_prevote(s, 1, t.b2.hash) for s in t.others))
    assert t.x.step is Step.PREVOTE and t.x.locked_round == 0
    t.expire()  # OnTimeoutPrevote: precommit nil
    t.feed(*(_precommit(s, 1, None) for s in t.others[:2]))
    while t.x.round == 1:
        t.expire()
    # Round 2: b2 re-proposed with valid_round 1 >= locked_round 0 and its POL: prevote b2.
    out = t.feed(_proposal(t.proposer(2), 2, t.b2, vr=1))
    assert _sent(out) == [(Prevote, t.b2.hash)]


def test_a_proof_of_lock_older_than_the_lock_does_not_release_it() -> None:
    t = _locked()
    # Lock again on b in round 1 (x is locked at round 1 now).
    p1 = t.proposer(1)
    t.feed(_proposal(p1, 1, t.b, vr=0))
    t.feed(*(_prevote(s, 1, t.b.hash) for s in t.others[:2]))
    assert t.x.locked_round == 1
    t.feed(*(_precommit(s, 1, None) for s in t.others[:2]))
    while t.x.round == 1:
        t.expire()
    # b2 re-proposed with valid_round 0 and 2f+1 prevotes for it in round 0 (the others
    # equivocate to make them): older than x's lock at round 1, so x prevotes nil.
    assert t.feed(_proposal(t.proposer(2), 2, t.b2, vr=0)).broadcast == []
    out = t.feed(*(_prevote(s, 0, t.b2.hash) for s in t.others))
    assert _sent(out) == [(Prevote, None)]
    assert t.x.locked_block == t.b and len(t.x.evidence) >= 2


def test_a_proof_of_lock_without_the_prevotes_is_not_enough() -> None:
    t = _locked()
    t.to_round(2)
    out = t.feed(_proposal(t.proposer(2), 2, t.b2, vr=1))  # claims a POL nobody showed
    assert out.broadcast == []
    out = t.expire()  # OnTimeoutPropose
    assert _sent(out) == [(Prevote, None)]


def test_the_valid_value_is_reproposed_with_its_round() -> None:
    t = _locked()
    t.to_round(3)
    assert t.x.proposer(3) == t.x.node_id
    sent = [m for m in t.x.snapshot()["sent"] if m["type"] == "proposal"]
    assert sent and sent[-1]["round"] == 3 and sent[-1]["valid_round"] == 0
    assert sent[-1]["block"]["root"] == t.b.root


# -- rounds and timeouts ------------------------------------------------------------------------


def test_f_plus_one_messages_of_a_higher_round_skip_to_it() -> None:
    net = Net.make(4)
    x = net.machines[0]
    x.start(NOW)
    others = [s for s in net.signers if s.node_id != x.node_id]
    x.receive(_prevote(others[0], 5, None), NOW)
    assert x.round == 0  # one message could be a liar's
    x.receive(_precommit(others[1], 5, None), NOW)
    assert x.round == 5 and x.step in (Step.PROPOSE, Step.PREVOTE)


def test_two_thirds_prevotes_of_anything_start_the_prevote_timeout() -> None:
    net = Net.make(4)
    x = net.machines[0]
    x.start(NOW)
    x.handle_timer(NOW + TIMEOUTS.propose)  # no proposal: prevote nil
    assert x.step is Step.PREVOTE
    others = [s for s in net.signers if s.node_id != x.node_id]
    b = net.ledgers[0].propose(
        proposer=others[0], records=artifact_records(others[0], 1), timestamp=int(NOW)
    )
    later = NOW + TIMEOUTS.propose
    x.receive(_prevote(others[0], 0, b.hash), later)
    assert x.next_deadline() == later + TIMEOUTS.rebroadcast  # 2 prevotes: no timer yet
    out = x.receive(_prevote(others[1], 0, None), later)
    assert out.broadcast == []  # 3 prevotes, no 2f+1 for one value: wait
    assert x.next_deadline() == later + TIMEOUTS.prevote
    out = x.handle_timer(later + TIMEOUTS.prevote)
    assert _sent(out) == [(Precommit, None)]


def test_timeouts_grow_linearly_per_round() -> None:
    t = Timeouts(propose=3, propose_delta=0.5, prevote=1, prevote_delta=0.25)
    assert [t.of(TimeoutKind.PROPOSE, r) for r in range(3)] == [3, 3.5, 4]
    assert [t.of(TimeoutKind.PREVOTE, r) for r in range(3)] == [1, 1.25, 1.5]
    with pytest.raises(ConsensusError):
        Timeouts(propose=0)


def test_proposer_rotation_is_deterministic_by_height_and_round() -> None:
    net = Net.make(4)
    vs = net.ledgers[0].validators
    ordered = vs.ordered()
    assert [proposer_of(vs, 1, r) for r in range(5)] == [ordered[(1 + r) % 4] for r in range(5)]
    assert proposer_of(vs, 2, 0) == proposer_of(vs, 1, 1)


# -- equivocation -----------------------------------------------------------------------------


def test_equivocating_votes_are_evidence_and_both_count() -> None:
    net = Net.make(4)
    x = net.machines[0]
    x.start(NOW)
    p0 = net.signers[net.index_of(x.proposer(0))]
    b = net.ledgers[0].propose(proposer=p0, records=artifact_records(p0, 1), timestamp=int(NOW))
    x.receive(_proposal(p0, 0, b), NOW)
    liar = next(s for s in net.signers if s.node_id not in (x.node_id, p0.node_id))
    x.receive(_prevote(liar, 0, None), NOW)
    out = x.receive(_prevote(liar, 0, b.hash), NOW)
    assert out.ignored == []
    assert len(x.evidence) == 1
    # x's prevote for b + the liar's b prevote + p0's = 2f+1: x locks b.
    x.receive(_prevote(p0, 0, b.hash), NOW)
    assert x.locked_block == b
    # A second, different proposal from the proposer in one round is evidence too.
    b2 = net.ledgers[0].propose(proposer=p0, records=artifact_records(p0, 2), timestamp=int(NOW))
    x.receive(_proposal(p0, 0, b2), NOW)
    assert len(x.evidence) == 2
    # A vote for a block nobody proposed can't be a second vote (it would be unbounded).
    out = x.receive(_prevote(liar, 0, "cd" * 32), NOW)
    assert "unknown block" in out.ignored[0][1]


# -- crash and restart ---------------------------------------------------------------------------


def test_a_restarted_validator_resumes_and_never_signs_a_second_vote() -> None:
    net = Net.make(4)
    x = net.machines[0]
    x.start(NOW)
    p0 = net.signers[net.index_of(x.proposer(0))]
    b = net.ledgers[0].propose(proposer=p0, records=artifact_records(p0, 1), timestamp=int(NOW))
    out = x.receive(_proposal(p0, 0, b), NOW)
    (vote,) = out.broadcast
    assert isinstance(vote, Prevote) and vote.block_hash == b.hash
    stored = canonical_json(x.snapshot())  # what the runtime persists before sending
    # Crash; a new machine for the same height restores it.
    y = TendermintMachine(
        net.ledgers[0], net.signers[0], net.ledgers[0].validators, ORIGIN, 1, timeouts=TIMEOUTS
    )
    y.restore(canonical_loads(stored))
    out = y.start(NOW + 10)
    assert y.step is Step.PREVOTE and y.round == 0
    assert out.broadcast == [vote]  # the same prevote, re-sent
    # Its prevote timeout expires: it precommits nil, but never prevotes again in round 0.
    signed: list[Message] = list(out.broadcast)
    for _ in range(6):
        deadline = y.next_deadline()
        assert deadline is not None
        signed += y.handle_timer(deadline).broadcast
    prevotes0 = {m.signature_bytes for m in signed if isinstance(m, Prevote) and m.round == 0}
    assert prevotes0 == {vote.signature}


def test_a_restored_lock_is_kept() -> None:
    t = _locked()
    snap = t.x.snapshot()
    y = TendermintMachine(
        t.net.ledgers[0], t.x.signer, t.x.validators, ORIGIN, 1, timeouts=TIMEOUTS
    )
    y.restore(snap)
    y.start(t.now)
    assert (y.round, y.locked_round, y.locked_block) == (1, 0, t.b)
    out = y.receive(_proposal(t.proposer(1), 1, t.b2), t.now)
    assert _sent(out) == [(Prevote, None)]


def test_a_validator_that_crashed_after_deciding_hands_out_the_decision_again() -> None:
    net = Net.make(1)
    m = net.machines[0]
    out = m.start(NOW)
    assert out.committed is not None
    stored = canonical_json(m.snapshot())
    y = TendermintMachine(net.ledgers[0], net.signers[0], net.ledgers[0].validators, ORIGIN, 1)
    y.restore(canonical_loads(stored))
    again = y.start(NOW + 1)
    assert again.committed == out.committed and again.broadcast == []
    assert y.step is Step.DECIDED
    net.ledgers[0].append(again.committed, now=NOW)


def test_a_validator_restored_after_precommitting_waits_in_precommit() -> None:
    t = _locked()
    # Back in round 0 right after x precommitted b: rebuild that state from a snapshot.
    snap = t.x.snapshot()
    snap = {**snap, "round": 0, "step": "precommit"}
    y = TendermintMachine(
        t.net.ledgers[0], t.x.signer, t.x.validators, ORIGIN, 1, timeouts=TIMEOUTS
    )
    y.restore(snap)
    out = y.start(t.now)
    assert y.step is Step.PRECOMMIT and y.round == 0
    assert {(type(m), m.round) for m in out.broadcast} == {(Prevote, 0), (Precommit, 0)}
    # Stuck, it re-sends only the same messages; it never signs round 0 again.
    deadline = y.next_deadline()
    assert deadline == t.now + TIMEOUTS.rebroadcast
    later = y.handle_timer(deadline)
    assert y.round == 0
    assert {m for m in later.broadcast if m.sender == y.node_id} <= set(out.broadcast)
    # The others' precommits (their re-broadcasts) arm OnTimeoutPrecommit again.
    for s in t.others[:2]:
        y.receive(_precommit(s, 0, None), deadline)
    timeout = y.next_deadline()
    assert timeout == deadline + TIMEOUTS.precommit
    y.handle_timer(timeout)
    assert y.round == 1


def test_restore_refuses_other_heights_networks_and_junk() -> None:
    net = Net.make(4)
    x = net.machines[0]
    snap = x.snapshot()
    y = TendermintMachine(net.ledgers[0], net.signers[0], net.ledgers[0].validators, ORIGIN, 2)
    with pytest.raises(ConsensusError, match="height"):
        y.restore(snap)
    with pytest.raises(ConsensusError):
        x.restore({**snap, "origin": "other/net"})
    with pytest.raises(ConsensusError):
        x.restore({**snap, "sent": [{"type": "prevote"}]})
    with pytest.raises(ConsensusError):
        x.restore({**snap, "locked_round": 0})  # a lock round without a block
    with pytest.raises(ConsensusError):
        x.restore({"height": 1})
    with pytest.raises(ConsensusError):
        x.restore({**snap, "step": "decided"})  # decided without a decision
    with pytest.raises(ConsensusError):
        x.restore({**snap, "step": ["propose"]})
    foreign = _prevote(net.signers[1], 0, None).to_json()
    with pytest.raises(ConsensusError, match="not signed by this node"):
        x.restore({**snap, "sent": [foreign]})
    x.start(NOW)
    with pytest.raises(ConsensusError, match="before start"):
        x.restore(snap)


# -- the rules as data ---------------------------------------------------------------------------


def test_the_rule_tables_cover_algorithm_1() -> None:
    assert sorted(r.line for r in UPON_RULES) == [22, 28, 34, 36, 44, 47, 49, 55]
    assert UPON_RULES[0].line == 49  # deciding wins over everything
    assert not any(step is Step.DECIDED for step, _ in STEP_TRANSITIONS)  # terminal
    assert {t for _, t in STEP_TRANSITIONS} == set(Trigger)
    assert set(TIMEOUT_RULES) == set(TimeoutKind)
    for steps, trigger in TIMEOUT_RULES.values():
        for step in steps:
            assert (step, trigger) in STEP_TRANSITIONS


def test_an_illegal_transition_raises() -> None:
    net = Net.make(1)
    m = net.machines[0]
    m.start(NOW)
    assert m.step is Step.DECIDED
    with pytest.raises(ConsensusError, match="illegal transition"):
        m._transition(Trigger.SEND_PREVOTE)
    # A decided machine ignores everything else.
    out = m.receive(_prevote(net.signers[0], 0, None), NOW)
    assert out.ignored[0][1] == "this height is already decided"
    assert m.handle_timer(NOW + 100).broadcast == []


def test_the_machine_requires_a_validator_and_a_real_height() -> None:
    net = Net.make(4)
    ledger = net.ledgers[0]
    with pytest.raises(ConsensusError):
        TendermintMachine(ledger, OUTSIDER, ledger.validators, ORIGIN, 1)
    with pytest.raises(ConsensusError):
        TendermintMachine(ledger, net.signers[0], ledger.validators, ORIGIN, 0)


def test_stuck_machines_rebroadcast_what_they_hold() -> None:
    net = Net.make(4)
    x = net.machines[0]
    x.start(NOW)
    x.handle_timer(NOW + TIMEOUTS.propose)  # prevote nil, then nothing arrives
    assert x.step is Step.PREVOTE
    deadline = x.next_deadline()
    assert deadline == NOW + TIMEOUTS.propose + TIMEOUTS.rebroadcast
    out = x.handle_timer(deadline)
    assert [(type(m), m.round) for m in out.broadcast] == [(Prevote, 0)]


def test_future_messages_buffer_is_bounded() -> None:
    buf = FutureMessages(max_ahead=1, max_messages=2)
    m2 = _prevote(SIGNERS[0], 0, None, height=2)
    m3 = _prevote(SIGNERS[0], 0, None, height=3)
    assert buf.add(m2, 1) is None
    assert buf.add(m3, 1) is not None  # too far ahead
    assert buf.add(m2, 2) is not None  # not ahead
    assert buf.add(_prevote(SIGNERS[1], 0, None, height=2), 1) is None
    assert buf.add(_prevote(SIGNERS[2], 0, None, height=2), 1) == "future-message buffer is full"
    assert len(buf) == 2
    assert [m.sender for m in buf.take(2)] == [SIGNERS[0].node_id, SIGNERS[1].node_id]
    assert len(buf) == 0
