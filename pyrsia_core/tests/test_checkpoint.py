"""Tests for C2SP checkpoints in C2SP signed notes."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrsia_core._checkpoint import (
    MAX_NOTE_SIZE,
    MAX_SIGNATURES,
    Checkpoint,
    NoteSignature,
    NoteVerifier,
    SignedNote,
    key_hash,
    open_checkpoint,
    sign_checkpoint,
    sign_note,
    verify_note,
)
from pyrsia_core._identity import Ed25519Signer, PublicKey
from pyrsia_core.errors import CheckpointError, NoteError, SignatureError

ORIGIN = "pyrsia.example/net-1"
ROOT = hashlib.sha256(b"root").digest()
SIGNERS = [Ed25519Signer.from_seed(bytes([i + 1]) * 32) for i in range(4)]
NAMES = [f"{ORIGIN}/{s.node_id}" for s in SIGNERS]
VERIFIERS = [NoteVerifier(name, s.public_key) for name, s in zip(NAMES, SIGNERS, strict=True)]
OUTSIDER = Ed25519Signer.from_seed(b"\x99" * 32)
CP = Checkpoint(ORIGIN, 1234, ROOT, ("block 7 abc",))

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def signed(cp: Checkpoint = CP, signers: list[int] | None = None) -> SignedNote:
    chosen = range(4) if signers is None else signers
    return sign_checkpoint(cp, [(NAMES[i], SIGNERS[i]) for i in chosen])


def spec_key_hash(name: str, raw_public_key: bytes) -> bytes:
    """c2sp.org/signed-note: SHA-256(key name || 0x0A || 0x01 || 32-byte public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\x0a" + b"\x01" + raw_public_key).digest()[:4]


# --------------------------------------------------------------------------
# Key hashes and interoperability with golang.org/x/mod/sumdb/note
# --------------------------------------------------------------------------

# Test vectors from the Go reference implementation (sumdb/note docs and tests).
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT
    + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqd"
    "ngotpRZb6KE6RyyBwJnAM=\n"
)


def go_verifier_key(vkey: str) -> tuple[str, str, PublicKey]:
    name, hash_hex, material = vkey.split("+", 2)
    raw = base64.b64decode(material)
    assert raw[0] == 0x01  # Ed25519
    return name, hash_hex, PublicKey(raw[1:])


@pytest.mark.parametrize(
    "vkey",
    [GO_VKEY, "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"],
)
def test_key_hash_matches_published_keys(vkey: str) -> None:
    name, hash_hex, public_key = go_verifier_key(vkey)
    assert key_hash(name, public_key).hex() == hash_hex
    assert spec_key_hash(name, public_key.raw).hex() == hash_hex
    assert NoteVerifier(name, public_key).key_hash.hex() == hash_hex


def test_key_hash_matches_spec_formula() -> None:
    for name, signer in zip(NAMES, SIGNERS, strict=True):
        expected = spec_key_hash(name, signer.public_key.raw)
        assert key_hash(name, signer.public_key) == expected
        assert sign_note("x\n", signer, name).key_hash == expected
    for bad in ["", "a b", "a+b", "a\tb", "a\u00a0b", "a\nb", "a\x01b"]:
        with pytest.raises(NoteError):
            key_hash(bad, SIGNERS[0].public_key)


def test_go_note_reproduced_and_verified() -> None:
    prefix, key, name, hash_hex, material = GO_SKEY.split("+", 4)
    seed = base64.b64decode(material)
    assert (prefix, key, seed[0]) == ("PRIVATE", "KEY", 0x01)
    signer = Ed25519Signer.from_seed(seed[1:])
    sig = sign_note(GO_TEXT, signer, name)
    assert sig.key_hash.hex() == hash_hex
    # Ed25519 is deterministic: we must produce the Go note byte for byte.
    assert SignedNote(GO_TEXT, (sig,)).to_text() == GO_NOTE

    vname, _, public_key = go_verifier_key(GO_VKEY)
    note = SignedNote.parse(GO_NOTE)
    assert note.text == GO_TEXT
    assert verify_note(note, [NoteVerifier(vname, public_key)], 1) == {"PeterNeumann"}
    tampered = SignedNote.parse(GO_NOTE.replace("cryptography", "cryptographY"))
    with pytest.raises(NoteError):
        verify_note(tampered, [NoteVerifier(vname, public_key)], 1)


def test_spec_example_note_parses() -> None:
    note_text = (
        "Ognuno sta solo sul cuor della terra\n"
        "trafitto da un raggio di sole:\n"
        "\n"
        "ed è subito sera.\n"
    )
    data = (
        note_text + "\n— quasimodo.example/salvatore "
        "NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfLW9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
    )
    note = SignedNote.parse(data)
    assert note.text == note_text  # split at the *last* blank line
    assert [s.name for s in note.signatures] == ["quasimodo.example/salvatore"]
    assert len(note.signatures[0].key_hash) == 4
    assert len(note.signatures[0].signature) == 64
    assert note.to_text() == data
    assert SignedNote.parse(data.encode()) == note


# --------------------------------------------------------------------------
# Checkpoint bodies
# --------------------------------------------------------------------------


def test_checkpoint_text_format() -> None:
    b64 = base64.b64encode(ROOT).decode()
    assert CP.to_text() == f"{ORIGIN}\n1234\n{b64}\nblock 7 abc\n"
    assert Checkpoint(ORIGIN, 0, ROOT).to_text() == f"{ORIGIN}\n0\n{b64}\n"
    assert Checkpoint.from_text(CP.to_text()) == CP
    assert Checkpoint.from_text(f"{ORIGIN}\n0\n{b64}\n") == Checkpoint(ORIGIN, 0, ROOT)
    big = 2**64 - 1
    assert Checkpoint.from_text(f"o\n{big}\n{b64}\n").size == big


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "origin\n",
        "origin\n12\n",
        "origin\n12\nROOT",  # no final newline
        "\n12\nROOT\n",  # empty origin
        "origin\n012\nROOT\n",
        "origin\n00\nROOT\n",
        "origin\n+12\nROOT\n",
        "origin\n-1\nROOT\n",
        "origin\n 12\nROOT\n",
        "origin\n12 \nROOT\n",
        "origin\n1_000\nROOT\n",
        "origin\n0x10\nROOT\n",
        "origin\n\u0661\u0662\nROOT\n",  # Arabic-Indic digits
        "origin\n\nROOT\n",
        f"origin\n{2**64}\nROOT\n",
        "origin\n99999999999999999999999\nROOT\n",
        "origin\n12\n" + base64.b64encode(ROOT[:31]).decode() + "\n",
        "origin\n12\n" + base64.b64encode(ROOT + b"\x00").decode() + "\n",
        "origin\n12\n" + base64.b64encode(ROOT).decode().rstrip("=") + "\n",
        "origin\n12\n" + base64.urlsafe_b64encode(b"\xff" * 32).decode() + "\n",
        "origin\n12\n" + base64.b64encode(ROOT).decode()[:-2] + "R=\n",  # non-canonical bits
        "origin\n12\n ROOT\n",
        "origin\n12\nROOT\n\n",  # empty extension line
        "origin\n12\nROOT\next\n\n",
        "origin\r\n12\nROOT\n",
        "ori\x00gin\n12\nROOT\n",
        "origin\n12\nROOT\nex\ttension\n",
    ],
)
def test_checkpoint_from_text_is_strict(text: str) -> None:
    text = text.replace("ROOT", base64.b64encode(ROOT).decode())
    with pytest.raises(CheckpointError):
        Checkpoint.from_text(text)


def test_checkpoint_fields_are_validated() -> None:
    bad = [
        ("", 1, ROOT, ()),
        ("a\nb", 1, ROOT, ()),
        (ORIGIN, -1, ROOT, ()),
        (ORIGIN, 2**64, ROOT, ()),
        (ORIGIN, True, ROOT, ()),
        (ORIGIN, 1, ROOT[:31], ()),
        (ORIGIN, 1, ROOT.hex(), ()),
        (ORIGIN, 1, ROOT, ("",)),
        (ORIGIN, 1, ROOT, ("a\nb",)),
        (ORIGIN, 1, ROOT, ["x"]),
    ]
    for args in bad:
        with pytest.raises(CheckpointError):
            Checkpoint(*args)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError):
        Checkpoint.from_text(b"origin\n1\nroot\n")  # type: ignore[arg-type]


@SETTINGS
@given(
    st.text(
        st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="\n"), min_size=1
    ),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=32, max_size=32),
    st.lists(
        st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1).filter(
            lambda s: "\n" not in s
        ),
        max_size=3,
    ),
)
def test_checkpoint_round_trip(origin: str, size: int, root: bytes, ext: list[str]) -> None:
    cp = Checkpoint(origin, size, root, tuple(ext))
    assert Checkpoint.from_text(cp.to_text()) == cp


# --------------------------------------------------------------------------
# Signing and verification policy
# --------------------------------------------------------------------------


def test_sign_and_verify_threshold_3_of_4() -> None:
    note = signed()
    assert len(note.signatures) == 4
    assert verify_note(note, VERIFIERS, 3) == frozenset(NAMES)
    assert verify_note(note, VERIFIERS, 4) == frozenset(NAMES)
    cp, names = open_checkpoint(note.to_text(), VERIFIERS, 3)
    assert cp == CP
    assert names == frozenset(NAMES)
    cp, names = open_checkpoint(note.to_bytes(), VERIFIERS, 3, origin=ORIGIN)
    assert cp == CP

    three = signed(signers=[0, 2, 3])
    assert verify_note(three, VERIFIERS, 3) == {NAMES[0], NAMES[2], NAMES[3]}
    with pytest.raises(NoteError, match="3 of 4"):
        verify_note(three, VERIFIERS, 4)

    two = signed(signers=[1, 3])
    with pytest.raises(NoteError, match="2 of 4"):
        verify_note(two, VERIFIERS, 3)
    with pytest.raises(NoteError):
        open_checkpoint(two.to_text(), VERIFIERS, 3)


def test_duplicate_signatures_count_once() -> None:
    note = signed(signers=[0, 0, 1, 1])
    assert len(note.signatures) == 4
    assert verify_note(note, VERIFIERS, 2) == {NAMES[0], NAMES[1]}
    with pytest.raises(NoteError, match="2 of 4"):
        verify_note(note, VERIFIERS, 3)


def test_unknown_signatures_are_ignored() -> None:
    note = signed(signers=[0, 1, 2])
    text = note.text
    outsider = sign_note(text, OUTSIDER, "someone.else/key")
    # Same name as a known key, but another key (so another key hash): unknown.
    same_name = sign_note(text, OUTSIDER, NAMES[3])
    # Same key hash as a known key, but another name: unknown (and it does not verify).
    same_hash = NoteSignature("impostor.example", VERIFIERS[3].key_hash, b"\x00" * 64)
    # Unknown signature type / length: ignored too.
    odd = NoteSignature("other.example/pq", b"\x01\x02\x03\x04", b"\xaa" * 3000)
    extended = SignedNote(text, (outsider, *note.signatures, same_name, same_hash, odd))
    parsed = SignedNote.parse(extended.to_text())
    assert parsed == extended
    assert verify_note(parsed, VERIFIERS, 3) == {NAMES[0], NAMES[1], NAMES[2]}
    with pytest.raises(NoteError, match="3 of 4"):
        verify_note(parsed, VERIFIERS, 4)
    only_unknown = SignedNote(text, (outsider, same_name, same_hash))
    with pytest.raises(NoteError, match="0 of 4"):
        verify_note(only_unknown, VERIFIERS, 1)


def test_bad_signature_of_known_key_rejects_note() -> None:
    note = signed()
    sigs = list(note.signatures)
    sig = sigs[2]
    broken = NoteSignature(
        sig.name, sig.key_hash, sig.signature[:-1] + bytes([sig.signature[-1] ^ 1])
    )
    with pytest.raises(NoteError, match="does not verify"):
        verify_note(SignedNote(note.text, (*sigs[:2], broken, sigs[3])), VERIFIERS, 3)
    # Even when the other three alone would satisfy the threshold.
    with pytest.raises(NoteError):
        verify_note(SignedNote(note.text, (*sigs[:2], sigs[3], broken)), VERIFIERS, 1)
    # A known key's signature over other text.
    other = sign_note("other text\n", SIGNERS[2], NAMES[2])
    with pytest.raises(NoteError):
        verify_note(SignedNote(note.text, (*sigs[:2], other)), VERIFIERS, 2)
    # A known key with a truncated signature.
    short = NoteSignature(sig.name, sig.key_hash, sig.signature[:63])
    with pytest.raises(NoteError):
        verify_note(SignedNote(note.text, (short,)), VERIFIERS, 1)
    # Tampered text.
    with pytest.raises(NoteError):
        verify_note(SignedNote(note.text.replace("1234", "1235"), note.signatures), VERIFIERS, 1)


def test_note_verifier() -> None:
    note = signed(signers=[0])
    v = VERIFIERS[0]
    v.verify(note.text, note.signatures[0])
    assert v.matches(note.signatures[0])
    assert not VERIFIERS[1].matches(note.signatures[0])
    with pytest.raises(NoteError):
        VERIFIERS[1].verify(note.text, note.signatures[0])
    with pytest.raises(SignatureError):
        v.verify(note.text + "x\n", note.signatures[0])
    assert NoteVerifier.for_signer(NAMES[0], SIGNERS[0]) == v
    assert hash(v) == hash(NoteVerifier(NAMES[0], SIGNERS[0].public_key))
    with pytest.raises(NoteError):
        NoteVerifier("bad name", SIGNERS[0].public_key)


def test_policy_errors_are_value_errors() -> None:
    note = signed()
    for threshold in (0, -1, 5, True, 2.0):
        with pytest.raises(ValueError) as info:
            verify_note(note, VERIFIERS, threshold)  # type: ignore[arg-type]
        assert not isinstance(info.value, NoteError)
    with pytest.raises(ValueError):
        verify_note(note, [], 1)
    clash = NoteVerifier(NAMES[0], OUTSIDER.public_key)
    object.__setattr__(clash, "key_hash", VERIFIERS[0].key_hash)
    with pytest.raises(ValueError):
        verify_note(note, [VERIFIERS[0], clash], 1)
    # Exact duplicates collapse: 4 distinct names, so threshold 4 still works.
    assert verify_note(note, VERIFIERS + VERIFIERS, 4) == frozenset(NAMES)
    with pytest.raises(ValueError):
        sign_checkpoint(CP, [])
    with pytest.raises(ValueError):
        sign_note("no newline", SIGNERS[0], NAMES[0])


def test_open_checkpoint_checks_origin_and_body() -> None:
    note = signed()
    with pytest.raises(CheckpointError):
        open_checkpoint(note.to_text(), VERIFIERS, 3, origin="other.example")
    # A validly signed note whose text is not a checkpoint.
    junk = SignedNote("hello\nworld\n", tuple(sign_note("hello\nworld\n", s, n) for n, s in
                                              zip(NAMES, SIGNERS, strict=True)))  # fmt: skip
    assert verify_note(junk, VERIFIERS, 4) == frozenset(NAMES)
    with pytest.raises(CheckpointError):
        open_checkpoint(junk.to_text(), VERIFIERS, 3)


# --------------------------------------------------------------------------
# Signed note parsing
# --------------------------------------------------------------------------


def test_note_round_trip() -> None:
    note = signed()
    text = note.to_text()
    assert text.startswith(CP.to_text() + "\n— ")
    assert text.count("\n\u2014 ") == 4
    assert SignedNote.parse(text) == note
    assert SignedNote.parse(text.encode()) == note
    assert SignedNote.parse(bytearray(text.encode())) == note  # type: ignore[arg-type]
    for sig, name in zip(note.signatures, NAMES, strict=True):
        line = f"— {name} " + base64.b64encode(sig.key_hash + sig.signature).decode() + "\n"
        assert line in text


VALID = signed().to_text()
SIG_B64 = base64.b64encode(b"\x01\x02\x03\x04" + b"\x00" * 64).decode()


MALFORMED_NOTES: list[object] = [
    "",
    "\n",
    "\n\n",
    "text\n",
    "text\n\n",  # no signatures
    "text\n— a " + SIG_B64 + "\n",  # no blank line
    "text\n\n— a " + SIG_B64,  # no final newline
    "text\n\n— a " + SIG_B64 + "\n\n",  # ends in a blank line
    "text\n\n- a " + SIG_B64 + "\n",  # hyphen, not em dash
    "text\n\n\u2013 a " + SIG_B64 + "\n",  # en dash
    "text\n\n—a " + SIG_B64 + "\n",  # no space after dash
    "text\n\n— a  " + SIG_B64 + "\n",  # two spaces
    "text\n\n— a " + SIG_B64 + " \n",  # trailing space
    "text\n\n— a\n",  # no signature
    "text\n\n—  " + SIG_B64 + "\n",  # empty name
    "text\n\n— a+b " + SIG_B64 + "\n",  # '+' in name
    "text\n\n— a\u00a0b " + SIG_B64 + "\n",  # Unicode space in name
    "text\n\n— a " + SIG_B64.rstrip("=") + "\n",  # missing padding
    "text\n\n— a " + SIG_B64[:-2] + "B=\n",  # non-canonical padding bits
    "text\n\n— a " + SIG_B64.replace("A", "-", 1) + "\n",  # base64url alphabet
    "text\n\n— a " + base64.b64encode(b"\x01\x02\x03\x04").decode() + "\n",  # hash only
    "text\n\n— a \n",
    "text\r\n\n— a " + SIG_B64 + "\n",  # CR
    "te\x00xt\n\n— a " + SIG_B64 + "\n",  # NUL
    "text\n\n— a " + SIG_B64 + "\r\n",
    "text\n\n— a " + SIG_B64 + "\n— b\n",
    "text\n\n— a " + SIG_B64 + "\nstray\n",
    "text\ud800\n\n— a " + SIG_B64 + "\n",  # lone surrogate
    "text\n\n" + ("— a " + SIG_B64 + "\n") * (MAX_SIGNATURES + 1),
    "x" * MAX_NOTE_SIZE + "\n\n— a " + SIG_B64 + "\n",
    "é" * (MAX_NOTE_SIZE // 2) + "\n\n— a " + SIG_B64 + "\n",  # > 1 MiB in UTF-8
    b"text\xff\n\n\xe2\x80\x94 a " + SIG_B64.encode() + b"\n",  # not UTF-8
    b"text\n\n\xe2\x80 a " + SIG_B64.encode() + b"\n",  # truncated em dash
    b"x" * (MAX_NOTE_SIZE + 1),
    12,
    None,
]


@pytest.mark.parametrize(
    "data", MALFORMED_NOTES, ids=[f"note{i}" for i in range(len(MALFORMED_NOTES))]
)
def test_malformed_notes_are_rejected(data: object) -> None:
    with pytest.raises(NoteError):
        SignedNote.parse(data)  # type: ignore[arg-type]


def test_note_limits_accept_up_to_the_cap() -> None:
    line = "— a " + SIG_B64 + "\n"
    note = SignedNote.parse("text\n\n" + line * MAX_SIGNATURES)
    assert len(note.signatures) == MAX_SIGNATURES
    # An empty line inside the text is fine; the last blank line separates.
    note = SignedNote.parse("a\n\nb\n\n" + line)
    assert note.text == "a\n\nb\n"
    assert SignedNote.parse("\n\n" + line).text == "\n"


def test_signed_note_fields_are_validated() -> None:
    sig = signed().signatures[0]
    bad = [
        ("no newline", (sig,)),
        ("text\n", ()),
        ("text\n", [sig]),
        ("text\n", (sig,) * (MAX_SIGNATURES + 1)),
        ("te\x01xt\n", (sig,)),
        (b"text\n", (sig,)),
    ]
    for args in bad:
        with pytest.raises(NoteError):
            SignedNote(*args)  # type: ignore[arg-type]
    for name, kh, raw in [
        ("a b", b"1234", b"s"),
        ("a", b"123", b"s"),
        ("a", b"1234", b""),
        ("a", "1234", b"s"),
    ]:
        with pytest.raises(NoteError):
            NoteSignature(name, kh, raw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Garbage and mutations: only NoteError / CheckpointError, never anything else
# --------------------------------------------------------------------------


def open_or_fail_cleanly(data: str | bytes) -> None:
    try:
        cp, names = open_checkpoint(data, VERIFIERS, 3)
    except (NoteError, CheckpointError):
        return
    # Anything that still opens must be the signed checkpoint itself.
    assert cp == CP
    assert len(names) >= 3


@SETTINGS
@given(st.one_of(st.text(), st.binary()))
def test_garbage_notes(data: str | bytes) -> None:
    open_or_fail_cleanly(data)
    try:
        SignedNote.parse(data)
    except NoteError:
        pass


NOTE_ALPHABET = st.sampled_from([*"\n —+=/aA0 \u2014\u00a0\r\x00é", VALID[5], "\ud800"])


@SETTINGS
@given(st.data())
def test_mutated_notes(data: st.DataObject) -> None:
    text = VALID
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["delete", "insert", "replace", "dup_line", "drop_line"]))
        pos = data.draw(st.integers(0, len(text) - 1)) if text else 0
        if op == "delete":
            length = data.draw(st.integers(1, 8))
            text = text[:pos] + text[pos + length :]
        elif op == "insert":
            text = text[:pos] + data.draw(NOTE_ALPHABET) + text[pos:]
        elif op == "replace":
            text = text[:pos] + data.draw(NOTE_ALPHABET) + text[pos + 1 :]
        else:
            lines = text.split("\n")
            i = data.draw(st.integers(0, len(lines) - 1))
            lines[i:i] = [lines[i]] if op == "dup_line" else []
            if op == "drop_line":
                del lines[i]
            text = "\n".join(lines)
    open_or_fail_cleanly(text)
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        return
    open_or_fail_cleanly(encoded)


@SETTINGS
@given(st.data())
def test_mutated_signature_bytes(data: st.DataObject) -> None:
    note = signed()
    i = data.draw(st.integers(0, 3))
    sig = note.signatures[i]
    raw = bytearray(sig.key_hash + sig.signature)
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    mutated = NoteSignature(sig.name, bytes(raw[:4]), bytes(raw[4:]))
    sigs = (*note.signatures[:i], mutated, *note.signatures[i + 1 :])
    text = SignedNote(note.text, sigs).to_text()
    if pos < 4:
        # Another key hash: an unknown key, ignored; three valid signatures remain.
        assert open_checkpoint(text, VERIFIERS, 3)[1] == frozenset(NAMES) - {NAMES[i]}
        with pytest.raises(NoteError):
            open_checkpoint(text, VERIFIERS, 4)
    else:
        with pytest.raises(NoteError):
            open_checkpoint(text, VERIFIERS, 3)
