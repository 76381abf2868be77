"""Witness cosigning: C2SP ``tlog-cosignature`` (cosignature/v1, Ed25519) and the pure
state machine of a C2SP ``tlog-witness`` (``add-checkpoint``), plus split-view evidence.

A *cosignature* is a signed-note signature line on a checkpoint::

    — <witness name> base64(key ID(4) || timestamp(8, big-endian) || Ed25519 signature(64))

with key ID ``SHA-256(name || 0x0A || 0x04 || public key)[:4]``, over the message
``"cosignature/v1\\ntime <timestamp>\\n" || <checkpoint note text>``. Since it is a note
signature, cosignatures simply travel as further signature lines of the checkpoint
note: a verifier that does not know a witness ignores its line.

A witness keeps, per log origin, the latest checkpoint it cosigned. It cosigns a
new one only if it is signed by the log's keys (here: a quorum of the build nodes),
``old`` is the size it holds, and a consistency proof from that size verifies;
otherwise the request is refused with the status codes of the spec (400, 403, 404,
409 with ``text/x.tlog.size``, 422). A refused checkpoint that is validly signed by
the log but inconsistent with the one held is *split-view evidence*.

Everything here is pure: callers persist the state and speak HTTP.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

from ._checkpoint import Checkpoint, NoteSignature, NoteVerifier, SignedNote, verify_note
from ._identity import Ed25519Verifier, PublicKey, Signer
from ._merkle import verify_consistency
from .errors import CheckpointError, KeyError_, NoteError, ProofError, SignatureError

__all__ = [
    "COSIGNATURE_TYPE",
    "SIZE_CONTENT_TYPE",
    "AddCheckpointRequest",
    "Cosigner",
    "LogKeys",
    "SplitView",
    "WitnessOutcome",
    "WitnessPolicy",
    "WitnessRequestError",
    "add_checkpoint",
    "add_cosignatures",
    "cosign",
    "cosignature_key_id",
    "cosignature_message",
    "find_split_view",
]

#: Key ID algorithm byte of Ed25519 cosignature/v1 keys (tlog-cosignature §Format).
COSIGNATURE_TYPE: Final = 0x04
#: Content type of a 409 answer's body: the witness's tree size (tlog-witness).
SIZE_CONTENT_TYPE: Final = "text/x.tlog.size"
#: Most consistency proof lines a client may send (tlog-witness).
MAX_PROOF_LINES: Final = 63
_HEADER: Final = "cosignature/v1\n"
_TS: Final = struct.Struct(">Q")
_MAX_TIMESTAMP: Final = 2**63 - 1
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]{0,19}")
_SIG_BYTES: Final = 64


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if _b64(data) == text else None


def cosignature_key_id(name: str, public_key: PublicKey) -> bytes:
    """``SHA-256(name || 0x0A || 0x04 || 32-byte Ed25519 public key)[:4]``."""
    data = name.encode("utf-8") + b"\n" + bytes([COSIGNATURE_TYPE]) + public_key.raw
    return hashlib.sha256(data).digest()[:4]


def cosignature_message(note_text: str, timestamp: int) -> bytes:
    """The signed message: header line, timestamp line, then the checkpoint note text."""
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or not (
        0 <= timestamp <= _MAX_TIMESTAMP
    ):
        raise ValueError(f"cosignature timestamp {timestamp!r} is not in 0..2^63-1")
    if not isinstance(note_text, str) or not note_text.endswith("\n"):
        raise NoteError("a cosigned checkpoint's text ends with a newline")
    return f"{_HEADER}time {timestamp}\n{note_text}".encode()


def cosign(note_text: str, signer: Signer, name: str, timestamp: int) -> NoteSignature:
    """A cosignature/v1 line by ``signer`` (named ``name``) on ``note_text`` at ``timestamp``."""
    signature = signer.sign(cosignature_message(note_text, timestamp))
    return NoteSignature(
        name, cosignature_key_id(name, signer.public_key), _TS.pack(timestamp) + signature
    )


@attrs.frozen
class Cosigner:
    """A witness as a verifier knows it: its ``name`` and Ed25519 ``public_key``."""

    name: str
    public_key: PublicKey
    key_id: bytes = attrs.field(init=False, eq=False, repr=lambda h: h.hex())
    _verifier: Ed25519Verifier = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # NoteVerifier checks the name the signed-note way (no spaces, '+', controls).
        NoteVerifier(self.name, self.public_key)
        object.__setattr__(self, "key_id", cosignature_key_id(self.name, self.public_key))
        object.__setattr__(self, "_verifier", Ed25519Verifier(self.public_key))

    def vkey(self) -> str:
        """The signed-note verifier key: ``<name>+<hex key ID>+<base64(0x04 || key)>``."""
        return (f"{self.name}+{self.key_id.hex()}+"
                f"{_b64(bytes([COSIGNATURE_TYPE]) + self.public_key.raw)}")

    @classmethod
    def parse(cls, text: str) -> Cosigner:
        """``NAME=HEXKEY``, ``NAME=<vkey>`` or a bare vkey; bad input is a :class:`ValueError`."""
        if not isinstance(text, str) or not text:
            raise ValueError("a witness is NAME=PUBLIC_KEY (hex) or its vkey NAME+ID+KEY")
        name, sep, key = text.partition("=")
        if not sep:
            return cls._from_vkey(text)
        if "+" in key:
            cosigner = cls._from_vkey(key)
            if cosigner.name != name:
                raise ValueError(f"witness {name!r}: its vkey names {cosigner.name!r}")
            return cosigner
        try:
            return cls(name, PublicKey.from_hex(key))
        except (ValueError, KeyError_, NoteError) as exc:
            raise ValueError(f"witness {name!r:.80}: {exc}") from None

    @classmethod
    def _from_vkey(cls, text: str) -> Cosigner:
        parts = text.split("+", 2)
        if len(parts) != 3:
            raise ValueError(f"{text!r:.120} is not a vkey NAME+KEYID+BASE64KEY")
        name, key_id, encoded = parts
        raw = _unb64(encoded)
        if raw is None or len(raw) != 33 or raw[0] != COSIGNATURE_TYPE:
            raise ValueError(f"vkey {text!r:.120}: not a cosignature/v1 Ed25519 key (type 0x04)")
        try:
            cosigner = cls(name, PublicKey(raw[1:]))
        except (ValueError, KeyError_, NoteError) as exc:
            raise ValueError(f"vkey {text!r:.120}: {exc}") from None
        if cosigner.key_id.hex() != key_id:
            raise ValueError(f"vkey {text!r:.120}: its key ID does not match its key")
        return cosigner

    def matches(self, sig: NoteSignature) -> bool:
        return sig.name == self.name and sig.key_hash == self.key_id

    def verify(self, note_text: str, sig: NoteSignature) -> int:
        """The timestamp of ``sig`` if it is this witness's valid cosignature on
        ``note_text``; else :class:`SignatureError` (or :class:`NoteError` if not its)."""
        if not self.matches(sig):
            raise NoteError(f"signature by {sig.name!r:.80} is not from witness {self.name!r}")
        if len(sig.signature) != 8 + _SIG_BYTES:
            raise SignatureError(f"cosignature by {self.name!r} is not 72 bytes")
        (timestamp,) = _TS.unpack(sig.signature[:8])
        if timestamp > _MAX_TIMESTAMP:
            raise SignatureError(f"cosignature by {self.name!r} has a timestamp over 2^63-1")
        self._verifier.verify(sig.signature[8:], cosignature_message(note_text, timestamp))
        return int(timestamp)

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "public_key": self.public_key.hex, "vkey": self.vkey()}


def _tuple_of(items: Iterable[Cosigner]) -> tuple[Cosigner, ...]:
    return tuple(items)


def _verifier_tuple(items: Iterable[NoteVerifier]) -> tuple[NoteVerifier, ...]:
    return tuple(items)


@attrs.frozen
class WitnessPolicy:
    """Trust a checkpoint only with valid cosignatures from ``threshold`` of ``cosigners``."""

    cosigners: tuple[Cosigner, ...] = attrs.field(converter=_tuple_of)
    threshold: int

    def __attrs_post_init__(self) -> None:
        names = [c.name for c in self.cosigners]
        if len(set(names)) != len(names):
            raise ValueError("the witness policy names a witness twice")
        if (not isinstance(self.threshold, int) or isinstance(self.threshold, bool)
                or not 1 <= self.threshold <= len(self.cosigners)):
            raise ValueError(f"the witness threshold must be 1..{len(self.cosigners)} (the "
                             f"witnesses named), got {self.threshold!r}")

    def valid(self, note: SignedNote) -> dict[str, int]:
        """Witness name -> timestamp of each valid cosignature on ``note``.

        Lines from unknown keys are ignored (tlog-witness: clients MUST ignore them), and
        so is a line that claims a known key but does not verify: anyone relaying a note
        can append garbage, which must not make an honest checkpoint untrusted; it only
        never counts.
        """
        out: dict[str, int] = {}
        for sig in note.signatures:
            for c in self.cosigners:
                if c.matches(sig) and c.name not in out:
                    try:
                        out[c.name] = c.verify(note.text, sig)
                    except (SignatureError, NoteError):
                        pass
        return out

    def satisfied(self, note: SignedNote) -> bool:
        return len(self.valid(note)) >= self.threshold

    def check(self, note: SignedNote) -> frozenset[str]:
        """The witnesses that cosigned ``note``; :class:`NoteError` if fewer than threshold."""
        valid = self.valid(note)
        if len(valid) < self.threshold:
            raise NoteError(self.shortfall(len(valid)))
        return frozenset(valid)

    def shortfall(self, have: int) -> str:
        return (f"the checkpoint has valid cosignatures from {have} of the policy's witnesses "
                f"({', '.join(c.name for c in self.cosigners)}); {self.threshold} required "
                "(--witness-policy / --witness-threshold)")

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "witnesses": [c.to_json() for c in self.cosigners]}


def add_cosignatures(note: SignedNote, lines: Iterable[NoteSignature]) -> SignedNote:
    """``note`` with the cosignature ``lines`` it lacks appended (duplicates dropped)."""
    seen = {(s.name, s.key_hash, s.signature) for s in note.signatures}
    names = {(s.name, s.key_hash) for s in note.signatures}
    extra = []
    for s in lines:
        # One line per witness key: a second cosignature (another timestamp) adds nothing.
        if (s.name, s.key_hash, s.signature) in seen or (s.name, s.key_hash) in names:
            continue
        names.add((s.name, s.key_hash))
        extra.append(s)
    if not extra:
        return note
    return SignedNote(note.text, note.signatures + tuple(extra))


# -- the add-checkpoint request ----------------------------------------------------------


class WitnessRequestError(ValueError):
    """A malformed add-checkpoint request (HTTP 400)."""


@attrs.frozen
class AddCheckpointRequest:
    """``old <size>``, the consistency proof lines, an empty line, the checkpoint note."""

    old_size: int
    proof: tuple[bytes, ...]
    note: SignedNote

    def to_bytes(self) -> bytes:
        lines = [f"old {self.old_size}\n", *(_b64(h) + "\n" for h in self.proof), "\n"]
        return "".join(lines).encode() + self.note.to_bytes()

    @classmethod
    def parse(cls, body: bytes) -> AddCheckpointRequest:
        if not isinstance(body, (bytes, bytearray)):
            raise WitnessRequestError("the request body is bytes")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise WitnessRequestError("the request body is not UTF-8") from None
        head, sep, rest = text.partition("\n\n")
        if not sep:
            raise WitnessRequestError("the request has no empty line before the checkpoint")
        lines = head.split("\n")
        old = lines[0]
        if not old.startswith("old ") or not _DECIMAL.fullmatch(old[4:]):
            raise WitnessRequestError("the first line must be 'old <size>' (decimal, no "
                                      "leading zeros)")
        if len(lines) - 1 > MAX_PROOF_LINES:
            raise WitnessRequestError(f"more than {MAX_PROOF_LINES} consistency proof lines")
        proof = []
        for line in lines[1:]:
            raw = _unb64(line)
            if raw is None or len(raw) != 32:
                raise WitnessRequestError(f"proof line {line!r:.80} is not a base64 hash")
            proof.append(raw)
        try:
            note = SignedNote.parse(rest)
        except NoteError as exc:
            raise WitnessRequestError(f"the checkpoint is not a signed note: {exc}") from None
        return cls(int(old[4:]), tuple(proof), note)


# -- split-view evidence -------------------------------------------------------------------


@attrs.frozen
class SplitView:
    """Two checkpoints of one log, both signed by its keys, whose trees are inconsistent."""

    origin: str
    #: The checkpoint seen (and trusted) first, and the newer one, as signed note texts.
    first: str
    second: str
    reason: str
    seen_at: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "first": self.first, "second": self.second,
                "reason": self.reason, "seen_at": self.seen_at}

    @classmethod
    def from_json(cls, data: Any) -> SplitView:
        return cls(str(data["origin"]), str(data["first"]), str(data["second"]),
                   str(data["reason"]), int(data.get("seen_at", 0)))


def find_split_view(
    first: SignedNote, second: SignedNote, proof: Sequence[bytes] | None, *, seen_at: int = 0
) -> SplitView | None:
    """Evidence if ``first`` and ``second`` (both already verified as the log's) cannot be
    one append-only history: same size with another root, or (``first`` smaller) a
    ``proof`` that fails or is missing (``None``). ``None`` if they are consistent.
    Order the arguments by size (smaller first); equal sizes in either order."""
    a, b = Checkpoint.from_text(first.text), Checkpoint.from_text(second.text)
    if a.origin != b.origin:
        return None
    if a.size > b.size:
        raise ValueError("find_split_view wants the smaller checkpoint first")
    reason = None
    if a.size == b.size:
        if a.root != b.root:
            reason = f"two roots for tree size {a.size}"
    elif proof is None:
        reason = f"no consistency proof from size {a.size} to {b.size}"
    else:
        try:
            verify_consistency(a.size, b.size, a.root, b.root, proof)
        except ProofError as exc:
            reason = f"no valid consistency proof from size {a.size} to {b.size}: {exc}"
    if reason is None:
        return None
    return SplitView(a.origin, first.to_text(), second.to_text(), reason, seen_at)


# -- the witness state machine -------------------------------------------------------------


@attrs.frozen
class LogKeys:
    """A log a witness serves: its origin and the keys (and how many) that sign it."""

    origin: str
    verifiers: tuple[NoteVerifier, ...] = attrs.field(converter=_verifier_tuple)
    threshold: int


@attrs.frozen
class WitnessOutcome:
    """What the witness answers, and what it must persist before answering.

    ``state`` (when set) is the new latest cosigned checkpoint to store -- atomically with
    the check against the previous one. ``evidence`` is split-view evidence to keep.
    """

    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"
    state: SignedNote | None = None
    cosignature: NoteSignature | None = None
    evidence: SplitView | None = None


def _error(status: int, message: str, evidence: SplitView | None = None) -> WitnessOutcome:
    return WitnessOutcome(status, message.rstrip("\n") + "\n", evidence=evidence)


def add_checkpoint(
    request: AddCheckpointRequest,
    *,
    latest: SignedNote | None,
    log: LogKeys,
    signer: Signer,
    name: str,
    now: int,
    log_signed: bool = False,
) -> WitnessOutcome:
    """Decide one add-checkpoint request (tlog-witness §add-checkpoint).

    ``latest`` is the checkpoint this witness last cosigned for ``log`` (``None``: never).
    ``log_signed``: the caller knows this very checkpoint text to be the log's (a node
    holding the certified block it names, whose build nodes have changed since): then one
    valid signature of ``log``'s keys is enough (the spec's minimum: 403 only if none
    verifies), not ``log.threshold`` of today's keys.
    """
    note = request.note
    try:
        cp = Checkpoint.from_text(note.text)
    except CheckpointError as exc:
        return _error(400, f"not a checkpoint: {exc}")
    if cp.origin != log.origin:
        return _error(404, f"unknown log origin {cp.origin!r:.120}")
    try:
        verify_note(note, log.verifiers, 1 if log_signed else log.threshold)
    except (NoteError, SignatureError, ValueError) as exc:
        return _error(403, f"the checkpoint is not signed by the log's keys: {exc}")
    if request.old_size > cp.size:
        return _error(400, f"old size {request.old_size} is larger than the checkpoint size "
                      f"{cp.size}")
    held = Checkpoint.from_text(latest.text) if latest is not None else None
    known = held.size if held is not None else 0
    if request.old_size != known:
        return WitnessOutcome(409, f"{known}\n", SIZE_CONTENT_TYPE)
    if held is None or latest is None:
        if request.proof:
            return _error(400, "the consistency proof must be empty when the old size is 0")
    elif held.size == cp.size:
        if held.root != cp.root:
            evidence = find_split_view(latest, note, None, seen_at=now)
            return WitnessOutcome(409, f"{known}\n", SIZE_CONTENT_TYPE, evidence=evidence)
        if request.proof:
            return _error(422, "the consistency proof must be empty for equal sizes")
    else:
        evidence = find_split_view(latest, note, request.proof, seen_at=now)
        if evidence is not None:
            return _error(422, f"the consistency proof does not verify: {evidence.reason}",
                          evidence)
    line = cosign(note.text, signer, name, now)
    return WitnessOutcome(200, line.to_line(), "text/plain; charset=utf-8", state=note,
                          cosignature=line)
