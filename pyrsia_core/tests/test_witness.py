"""Tests for witness cosignatures (C2SP tlog-cosignature) and the add-checkpoint witness."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrsia_core._checkpoint import Checkpoint, NoteSignature, NoteVerifier, SignedNote
from pyrsia_core._identity import Ed25519Signer
from pyrsia_core._merkle import MerkleTree, leaf_hash
from pyrsia_core._witness import (
    SIZE_CONTENT_TYPE,
    AddCheckpointRequest,
    Cosigner,
    LogKeys,
    WitnessPolicy,
    WitnessRequestError,
    add_checkpoint,
    add_cosignatures,
    cosign,
    find_split_view,
)
from pyrsia_core.errors import NoteError, SignatureError

from pyrsia_core import sign_checkpoint

ORIGIN = "pyrsia/testnet"
BUILDERS = [Ed25519Signer.from_seed(bytes([i + 1]) * 32) for i in range(4)]
LOG = LogKeys(ORIGIN, [NoteVerifier(f"{ORIGIN}/{s.node_id}", s.public_key) for s in BUILDERS], 3)
WITNESS = Ed25519Signer.from_seed(b"\x42" * 32)
WNAME = "pyrsia-witness/w1"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tree(leaves: list[bytes]) -> MerkleTree:
    return MerkleTree.from_leaves(leaf_hash(x) for x in leaves)


def note_of(t: MerkleTree, size: int | None = None, signers: int = 3,
            origin: str = ORIGIN) -> SignedNote:
    n = t.size if size is None else size
    cp = Checkpoint(origin, n, t.root(n), (f"block {n} {'0' * 64}",))
    return sign_checkpoint(cp, [(f"{ORIGIN}/{s.node_id}", s) for s in BUILDERS[:signers]])


def ask(req: AddCheckpointRequest, latest: SignedNote | None, now: int = 1_700_000_000):
    return add_checkpoint(req, latest=latest, log=LOG, signer=WITNESS, name=WNAME, now=now)


# -- cosignatures -----------------------------------------------------------------------


def test_cosignature_matches_the_spec_byte_for_byte() -> None:
    """Checked with the cryptography library directly, from the spec's definitions only:
    key ID = SHA-256(name || 0x0A || 0x04 || key)[:4]; signature = key ID || u64 BE time
    || Ed25519 over "cosignature/v1\\ntime <t>\\n" || note text."""
    note = note_of(tree([b"a", b"b", b"c"]))
    line = cosign(note.text, WITNESS, WNAME, 1679315147).to_line()
    assert line.startswith("\u2014 " + WNAME + " ") and line.endswith("\n")
    raw = base64.b64decode(line.split(" ")[2])
    assert len(raw) == 4 + 8 + 64
    key = WITNESS.public_key.raw
    assert raw[:4] == hashlib.sha256(WNAME.encode() + b"\n\x04" + key).digest()[:4]
    assert struct.unpack(">Q", raw[4:12])[0] == 1679315147
    message = b"cosignature/v1\ntime 1679315147\n" + note.text.encode()
    Ed25519PublicKey.from_public_bytes(key).verify(raw[12:], message)  # raises if not


def test_cosigner_verifies_and_rejects_tampering() -> None:
    note = note_of(tree([b"a", b"b"]))
    sig = cosign(note.text, WITNESS, WNAME, 5)
    cosigner = Cosigner(WNAME, WITNESS.public_key)
    assert cosigner.verify(note.text, sig) == 5
    with pytest.raises(SignatureError):
        cosigner.verify(note.text.replace("2\n", "3\n", 1), sig)
    forged = NoteSignature(sig.name, sig.key_hash, struct.pack(">Q", 6) + sig.signature[8:])
    with pytest.raises(SignatureError):  # the timestamp is signed too
        cosigner.verify(note.text, forged)
    # A plain signed-note (0x01) signature by the same key is not a cosignature.
    assert not cosigner.matches(NoteSignature(WNAME, b"\0\0\0\0", b"x" * 64))


def test_vkey_round_trip_and_parsing() -> None:
    c = Cosigner(WNAME, WITNESS.public_key)
    assert Cosigner.parse(c.vkey()) == c
    assert Cosigner.parse(f"{WNAME}={WITNESS.public_key.hex}") == c
    assert Cosigner.parse(f"{WNAME}={c.vkey()}") == c
    for bad in ["", "nameonly", f"{WNAME}=zz", f"other={c.vkey()}",
                c.vkey().replace("+", "+00", 1), f"a b={WITNESS.public_key.hex}"]:
        with pytest.raises(ValueError):
            Cosigner.parse(bad)


def test_policy_counts_only_valid_cosignatures_of_known_witnesses() -> None:
    witnesses = [Ed25519Signer.from_seed(bytes([0x50 + i]) * 32) for i in range(3)]
    names = [f"w/{i}" for i in range(3)]
    policy = WitnessPolicy([Cosigner(n, w.public_key) for n, w in zip(names, witnesses,
                                                                     strict=True)], 2)
    note = note_of(tree([b"x"]))
    one = add_cosignatures(note, [cosign(note.text, witnesses[0], names[0], 1)])
    assert not policy.satisfied(one)
    with pytest.raises(NoteError, match="1 of the policy's witnesses"):
        policy.check(one)
    outsider = Ed25519Signer.from_seed(b"\x77" * 32)
    garbage = NoteSignature(names[1], Cosigner(names[1], witnesses[1].public_key).key_id,
                            b"\0" * 72)
    noisy = add_cosignatures(one, [cosign(note.text, outsider, "w/x", 1), garbage])
    assert policy.valid(noisy) == {names[0]: 1}
    two = add_cosignatures(one, [cosign(note.text, witnesses[2], names[2], 2)])
    assert policy.check(two) == {names[0], names[2]}
    # Cosignatures of another checkpoint do not carry over.
    other = note_of(tree([b"y"]))
    moved = SignedNote(other.text, two.signatures)
    assert policy.valid(moved) == {}
    with pytest.raises(ValueError):
        WitnessPolicy([Cosigner(names[0], witnesses[0].public_key)], 2)


# -- the request format ----------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**40), st.lists(st.binary(min_size=32, max_size=32), max_size=63))
def test_request_round_trips(old: int, proof: list[bytes]) -> None:
    note = note_of(tree([b"a"]))
    req = AddCheckpointRequest(old, tuple(proof), note)
    body = req.to_bytes()
    assert body.startswith(f"old {old}\n".encode())
    assert AddCheckpointRequest.parse(body) == req


@pytest.mark.parametrize("body", [
    b"", b"old 1\n", b"old 01\n\nx", b"old -1\n\n", b"new 1\n\n",
    b"old 1\nnot base64\n\n", b"old 1\n" + base64.b64encode(b"short") + b"\n\n",
    b"old 1\n\nnot a note\n", b"\xff\xfe",
    b"old 1\n" + b"".join(base64.b64encode(b"\0" * 32) + b"\n" for _ in range(64)) + b"\n",
])
def test_malformed_requests_are_refused(body: bytes) -> None:
    with pytest.raises(WitnessRequestError):
        AddCheckpointRequest.parse(body + (note_of(tree([b"a"])).to_bytes()
                                           if body.endswith(b"\n\n") else b""))


# -- the witness state machine ---------------------------------------------------------------


def test_witness_follows_an_append_only_log() -> None:
    t = tree([b"a", b"b", b"c"])
    first = note_of(t)
    out = ask(AddCheckpointRequest(0, (), first), None)
    assert out.status == 200 and out.state == first
    assert Cosigner(WNAME, WITNESS.public_key).verify(first.text, out.cosignature) > 0
    assert out.body == out.cosignature.to_line()
    t.extend([leaf_hash(b"d"), leaf_hash(b"e")])
    second = note_of(t)
    out2 = ask(AddCheckpointRequest(3, tuple(t.consistency_proof(3, 5)), second), first)
    assert out2.status == 200 and out2.state == second and out2.evidence is None
    # Same checkpoint again (another build node asks): cosigned, no proof needed.
    again = ask(AddCheckpointRequest(5, (), second), second)
    assert again.status == 200


def test_witness_refusals_follow_the_spec() -> None:
    t = tree([b"a", b"b", b"c", b"d"])
    held = note_of(t, 2)
    new = note_of(t)
    proof = tuple(t.consistency_proof(2, 4))
    # Stale old size: 409 with the witness's size as text/x.tlog.size.
    out = ask(AddCheckpointRequest(1, proof, new), held)
    assert (out.status, out.body, out.content_type) == (409, "2\n", SIZE_CONTENT_TYPE)
    assert out.state is None and out.cosignature is None
    # A client without state asks with old 0 and learns the size.
    assert ask(AddCheckpointRequest(0, (), new), held).body == "2\n"
    # Unknown origin: 404. Too few log signatures: 403. old > size: 400.
    assert ask(AddCheckpointRequest(2, proof, note_of(t, origin="other/log")), held).status == 404
    assert ask(AddCheckpointRequest(2, proof, note_of(t, signers=2)), held).status == 403
    assert ask(AddCheckpointRequest(5, proof, new), note_of(tree([b"a"] * 5))).status == 400
    # A proof that does not verify: 422, nothing cosigned, and evidence kept.
    bad = ask(AddCheckpointRequest(2, (b"\0" * 32,) * len(proof), new), held)
    assert bad.status == 422 and bad.state is None and bad.evidence is not None
    assert ask(AddCheckpointRequest(2, proof, new), held).status == 200


def test_same_size_other_root_is_a_conflict_with_evidence() -> None:
    a, b = tree([b"a", b"b"]), tree([b"a", b"B"])
    held, fork = note_of(a), note_of(b)
    out = ask(AddCheckpointRequest(2, (), fork), held)
    assert (out.status, out.body, out.content_type) == (409, "2\n", SIZE_CONTENT_TYPE)
    assert out.state is None and out.cosignature is None
    assert out.evidence is not None and "two roots for tree size 2" in out.evidence.reason
    assert out.evidence.first == held.to_text() and out.evidence.second == fork.to_text()


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6)), min_size=1, max_size=12))
def test_witness_never_cosigns_two_inconsistent_checkpoints(steps: list[tuple[bool, int]]
                                                            ) -> None:
    """Two forks of one log grow in turn; a client submits each new checkpoint with the
    witness's size (learned from a 409) and an honest proof from its own fork. Every pair
    of cosigned checkpoints must be consistent."""
    forks = [tree([b"common"]), tree([b"common"])]
    latest: SignedNote | None = None
    cosigned: list[tuple[int, bytes]] = []
    for which, grow in steps:
        t = forks[which]
        t.extend(leaf_hash(f"{which}-{t.size + i}".encode()) for i in range(grow))
        note = note_of(t)
        out = ask(AddCheckpointRequest(0, (), note), latest)
        if out.status == 409 and latest is not None:
            old = int(out.body)
            proof = tuple(t.consistency_proof(old, t.size)) if old <= t.size else ()
            out = ask(AddCheckpointRequest(min(old, t.size), proof, note), latest)
        if out.status == 200:
            latest = out.state
            cp = Checkpoint.from_text(note.text)
            cosigned.append((cp.size, cp.root))
    for i, (size_a, root_a) in enumerate(cosigned):
        for size_b, root_b in cosigned[i + 1:]:
            assert size_b >= size_a  # never rolled back
            owner = next(f for f in forks if f.size >= size_b and f.root(size_b) == root_b)
            assert owner.root(size_a) == root_a


def test_find_split_view() -> None:
    t = tree([b"a", b"b", b"c"])
    small, big = note_of(t, 2), note_of(t)
    assert find_split_view(small, big, t.consistency_proof(2, 3)) is None
    assert find_split_view(small, small, None) is None
    assert "no consistency proof" in find_split_view(small, big, None).reason
    assert "no valid" in find_split_view(small, big, [b"\0" * 32]).reason
    other = note_of(tree([b"a", b"x", b"c"]))
    assert "two roots" in find_split_view(big, other, None).reason
    with pytest.raises(ValueError):
        find_split_view(big, small, None)


def test_a_checkpoint_the_caller_holds_needs_no_current_log_signature() -> None:
    """A witness whose build nodes changed since a block still cosigns that block's
    checkpoint when it holds it (``log_signed``); without that, the current keys decide."""
    t = tree([b"a"])
    note = note_of(t, signers=1)  # fewer signatures than today's threshold
    assert ask(AddCheckpointRequest(0, (), note), None).status == 403
    out = add_checkpoint(AddCheckpointRequest(0, (), note), latest=None, log=LOG,
                         signer=WITNESS, name=WNAME, now=1, log_signed=True)
    assert out.status == 200
    # Still at least one valid signature of the log's keys (tlog-witness: else 403).
    bare = SignedNote(note.text, (NoteSignature("x", b"\0" * 4, b"\0" * 64),))
    out = add_checkpoint(AddCheckpointRequest(0, (), bare), latest=None, log=LOG,
                         signer=WITNESS, name=WNAME, now=1, log_signed=True)
    assert out.status == 403
    # Consistency is still checked: a held checkpoint of another root is refused.
    fork = note_of(tree([b"b"]))
    out = add_checkpoint(AddCheckpointRequest(1, (), fork), latest=note, log=LOG,
                         signer=WITNESS, name=WNAME, now=1, log_signed=True)
    assert out.status == 409 and out.evidence is not None
