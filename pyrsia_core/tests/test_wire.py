"""Peer message envelopes and the upload token bucket."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrsia_core._ratelimit import TokenBucket
from pyrsia_core._wire import MAX_SMALL_FRAME, Envelope, ReplayGuard, open_frame, seal
from pyrsia_core.errors import PeerMisbehaved

from pyrsia_core import Ed25519Signer, canonical_json

A = Ed25519Signer.from_seed(b"a" * 32)
B = Ed25519Signer.from_seed(b"b" * 32)


def test_round_trip() -> None:
    frame = seal(A, "FIND_NODE", {"target": "00" * 32}, address="http://127.0.0.1:1", now=1000)
    env = open_frame(frame, now=1010)
    assert env.type == "FIND_NODE" and env.sender == A.node_id
    assert env.body == {"target": "00" * 32} and env.address == "http://127.0.0.1:1"


def _mutate(frame: bytes, **changes: object) -> bytes:
    d = json.loads(frame)
    d.update(changes)
    return canonical_json(d)


@pytest.mark.parametrize(
    "changes",
    [
        {"body": {"target": "11" * 32}},  # body changed after signing
        {"from": B.node_id},  # claims another sender
        {"key": B.public_key.hex},  # another key
        {"sig": "00" * 64},
        {"sig": "zz"},
        {"type": "NOPE"},
        {"v": 2},
        {"nonce": "short"},
        {"ts": "1000"},
        {"addr": 5},
        {"extra": 1},
    ],
)
def test_tampered_frames_are_rejected(changes: dict[str, object]) -> None:
    frame = seal(A, "FIND_NODE", {"target": "00" * 32}, address="x", now=1000)
    with pytest.raises(PeerMisbehaved):
        open_frame(_mutate(frame, **changes), now=1000)


def test_unsigned_stale_replayed_and_oversized() -> None:
    frame = seal(A, "PING", {}, address="x", now=1000)
    d = json.loads(frame)
    del d["sig"]
    with pytest.raises(PeerMisbehaved):
        open_frame(canonical_json(d), now=1000)
    with pytest.raises(PeerMisbehaved, match="off"):
        open_frame(frame, now=5000)
    guard = ReplayGuard()
    guard.check(open_frame(frame, now=1000), 1000)
    with pytest.raises(PeerMisbehaved, match="replayed"):
        guard.check(open_frame(frame, now=1000), 1001)
    big = seal(A, "PING", {"pad": "x" * MAX_SMALL_FRAME}, address="x", now=1000)
    with pytest.raises(PeerMisbehaved, match="too large"):
        open_frame(big, now=1000)
    with pytest.raises(PeerMisbehaved, match="unexpected"):
        open_frame(frame, now=1000, expect={"PONG"})


@given(st.binary(max_size=400))
@settings(max_examples=200)
def test_garbage_only_raises_peer_misbehaved(data: bytes) -> None:
    with pytest.raises(PeerMisbehaved):
        open_frame(data, now=0)


def test_non_canonical_json_is_rejected() -> None:
    frame = seal(A, "PING", {}, address="x", now=1000)
    with pytest.raises(PeerMisbehaved):
        open_frame(json.dumps(json.loads(frame), indent=1).encode(), now=1000)


def test_token_bucket_rate() -> None:
    bucket = TokenBucket(rate=1000.0, burst=100.0)
    now, sent = 0.0, 0
    while now < 10.0:
        now += bucket.reserve(250, now)
        sent += 250
    # 100 bytes of burst plus 1000 bytes/s for 10 s, within one send.
    assert abs(sent - (100 + 1000 * now)) <= 250
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


def test_attachment_round_trip_and_tampering() -> None:
    bulk = b'[{"x": 1}]\n\x00' * 1000  # any bytes, newlines included
    frame = seal(A, "BLOCKS", {"count": 1}, address="a", now=1000, attachment=bulk)
    env = open_frame(frame, now=1000)
    assert env.attachment == bulk and env.body["count"] == 1
    assert env.body["attachment"]["size"] == len(bulk)
    head, _, rest = frame.partition(b"\n")
    for bad, reason in [
        (head + b"\n" + rest[:-1] + b"!", "SHA-256"),  # one byte changed
        (head + b"\n" + rest + b"x", "bytes, not"),  # one byte more
        (head, "carries none"),  # dropped
    ]:
        with pytest.raises(PeerMisbehaved, match=reason):
            open_frame(bad, now=1000)
    # An attachment the signed body does not declare, or on a type that takes none.
    plain = seal(A, "BLOCKS", {"count": 1}, address="a", now=1000)
    with pytest.raises(PeerMisbehaved, match="not declared"):
        open_frame(plain + b"\n[]", now=1000)
    ping = seal(A, "PING", {}, address="a", now=1000)
    with pytest.raises(PeerMisbehaved, match="carry no attachment"):
        open_frame(ping + b"\n[]", now=1000)
    with pytest.raises(ValueError):
        seal(A, "PING", {}, address="a", now=1000, attachment=b"x")


def _env(sender: str, nonce: str, ts: int) -> Envelope:
    return Envelope(type="PING", sender=sender, public_key=A.public_key, address="x",
                    timestamp=ts, nonce=nonce, body={}, raw=b"")


def test_replay_guard_cannot_be_flushed() -> None:
    """200,000 fresh nonces (from one sender, then from many) never push an old nonce out:
    a replay of the first frame is still refused; the flood itself is refused past the caps."""
    guard = ReplayGuard()
    first = open_frame(seal(A, "GET_HEAD", {}, address="x", now=1000), now=1000)
    guard.check(first, 1000)
    refused = 0
    for i in range(200_000):  # one sender
        try:
            guard.check(_env(B.node_id, f"{i:032x}", 1000), 1000 + i / 1000)
        except PeerMisbehaved as exc:
            assert "slow down" in exc.reason
            refused += 1
    assert refused == 200_000 - guard.max_per_sender
    for i in range(200_000):  # many senders
        with contextlib.suppress(PeerMisbehaved):
            guard.check(_env(f"{i:064x}", "ab" * 16, 1000), 1200)
    assert len(guard) <= guard.max_entries + 1
    with pytest.raises(PeerMisbehaved, match="replayed"):
        guard.check(first, 1250)
    # A verified peer still gets in while unverified senders fill the guard.
    guard.check(_env(A.node_id, "cd" * 16, 1250), 1250, trusted=True)


def test_replay_guard_is_bounded_by_time() -> None:
    guard = ReplayGuard(max_skew=300)
    frame = open_frame(seal(A, "PING", {}, address="x", now=1000), now=1000)
    guard.check(frame, 1000)
    with pytest.raises(PeerMisbehaved, match="replayed"):
        guard.check(frame, 1299)  # still acceptable by time: still remembered
    with pytest.raises(PeerMisbehaved, match="window"):
        guard.check(frame, 1301)  # too old to accept at all
    # Nonces are forgotten only once their frames cannot pass: memory is bounded by time.
    guard.check(_env(B.node_id, "01" * 16, 1300), 1300)
    guard.expire(2000)
    assert len(guard) == 0
