"""C2SP checkpoints (``c2sp.org/tlog-checkpoint``) in C2SP signed notes (``c2sp.org/signed-note``).

A checkpoint body is::

    <origin>\\n<tree size>\\n<base64 root hash>\\n[<extension line>\\n ...]

and it travels as the text of a signed note: the text (ending in a newline),
a blank line, then one or more signature lines
``— <key name> <base64(4-byte key hash || signature)>\\n`` (EM DASH U+2014,
space). Our signatures are Ed25519 (signature type 0x01), with key hash
``SHA-256(key name || 0x0A || 0x01 || 32-byte public key)[:4]``.

Parsing is strict and size-capped; :func:`verify_note` fails closed and
follows the spec: signatures from unknown keys (name and key hash) are
ignored, a known key whose signature does not verify rejects the whole note,
and fewer than ``threshold`` valid signatures reject it too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from typing import Final

import attrs

from ._identity import Ed25519Verifier, PublicKey, Signer
from .errors import CheckpointError, KeyError_, NoteError, SignatureError

__all__ = [
    "ED25519_SIGNATURE_TYPE",
    "MAX_NOTE_SIZE",
    "MAX_SIGNATURES",
    "Checkpoint",
    "NoteSignature",
    "NoteVerifier",
    "SignedNote",
    "key_hash",
    "open_checkpoint",
    "sign_checkpoint",
    "sign_note",
    "verify_note",
]

#: Largest signed note we parse, in UTF-8 bytes.
MAX_NOTE_SIZE: Final = 1 << 20
#: Most signature lines we accept in one note (the spec requires at least 16).
MAX_SIGNATURES: Final = 100
#: C2SP signed-note signature type identifier byte for Ed25519.
ED25519_SIGNATURE_TYPE: Final = 0x01
#: RFC 9162 tree sizes are uint64.
MAX_TREE_SIZE: Final = 2**64 - 1

_SIG_PREFIX: Final = "\u2014 "  # EM DASH, SPACE
_KEY_HASH_SIZE: Final = 4
_ROOT_SIZE: Final = 32
#: ASCII control characters other than newline (forbidden anywhere in a note).
_CONTROL: Final = re.compile(r"[\x00-\x09\x0b-\x1f]")
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]{0,19}")


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Strict standard base64 (RFC 4648 §4, padded, canonical), or ``None``."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if _b64encode(data) != text:  # rejects non-zero padding bits and missing padding
        return None
    return data


def _is_valid_key_name(name: object) -> bool:
    """Key names are non-empty, with no Unicode spaces, no '+' and no control characters."""
    return (
        isinstance(name, str)
        and name != ""
        and "+" not in name
        and not any(ch.isspace() for ch in name)
        and _CONTROL.search(name) is None
    )


def _check_key_name(name: object) -> str:
    if not _is_valid_key_name(name):
        raise NoteError(
            f"invalid note key name {name!r:.80}: empty, or has a space, '+' or control"
        )
    assert isinstance(name, str)
    return name


# -- checkpoints -------------------------------------------------------------


def _check_line(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise CheckpointError(f"checkpoint {what} must be a non-empty string")
    if "\n" in value or _CONTROL.search(value):
        raise CheckpointError(f"checkpoint {what} {value!r:.80} contains a newline or control")


def _check_origin(_: object, __: attrs.Attribute[str], value: str) -> None:
    _check_line("origin", value)


def _check_size(_: object, __: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"checkpoint size must be an int, got {type(value).__name__}")
    if not 0 <= value <= MAX_TREE_SIZE:
        raise CheckpointError(f"checkpoint size {value} is out of range")


def _check_root(_: object, __: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != _ROOT_SIZE:
        raise CheckpointError(f"checkpoint root hash must be {_ROOT_SIZE} bytes")


def _check_extensions(_: object, __: attrs.Attribute[tuple[str, ...]], value: object) -> None:
    if not isinstance(value, tuple):
        raise CheckpointError("checkpoint extensions must be a tuple of lines")
    for line in value:
        _check_line("extension line", line)


@attrs.frozen
class Checkpoint:
    """A transparency-log tree head: ``origin``, tree ``size`` and Merkle ``root``."""

    origin: str = attrs.field(validator=_check_origin)
    size: int = attrs.field(validator=_check_size)
    root: bytes = attrs.field(validator=_check_root, repr=lambda r: r.hex())
    extensions: tuple[str, ...] = attrs.field(default=(), validator=_check_extensions)

    def to_text(self) -> str:
        """The note text: origin, size, base64 root and extension lines, each ending in newline."""
        lines = [self.origin, str(self.size), _b64encode(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint body strictly; anything malformed raises :class:`CheckpointError`."""
        if not isinstance(text, str):
            raise CheckpointError(f"checkpoint text must be a str, got {type(text).__name__}")
        if len(text) > MAX_NOTE_SIZE:
            raise CheckpointError("checkpoint text is too large")
        if not text.endswith("\n"):
            raise CheckpointError("checkpoint text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError(
                f"checkpoint has {len(lines)} line(s); origin, size and root hash are required"
            )
        origin, size_text, root_text, *extensions = lines
        if not _DECIMAL.fullmatch(size_text):
            raise CheckpointError(
                f"checkpoint size {size_text!r:.40} is not a decimal without leading zeros"
            )
        root = _b64decode(root_text)
        if root is None:
            raise CheckpointError(f"checkpoint root hash {root_text!r:.80} is not base64")
        if len(root) != _ROOT_SIZE:
            raise CheckpointError(f"checkpoint root hash is {len(root)} bytes, not {_ROOT_SIZE}")
        return cls(origin=origin, size=int(size_text), root=root, extensions=tuple(extensions))


# -- signed notes -------------------------------------------------------------


def _check_sig_name(_: object, __: attrs.Attribute[str], value: str) -> None:
    _check_key_name(value)


def _check_sig_key_hash(_: object, __: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != _KEY_HASH_SIZE:
        raise NoteError(f"a note key hash is {_KEY_HASH_SIZE} bytes")


def _check_sig_bytes(_: object, __: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or not value:
        raise NoteError("a note signature is non-empty bytes")


@attrs.frozen
class NoteSignature:
    """One signature line: key ``name``, 4-byte ``key_hash`` and the raw ``signature``."""

    name: str = attrs.field(validator=_check_sig_name)
    key_hash: bytes = attrs.field(validator=_check_sig_key_hash, repr=lambda h: h.hex())
    signature: bytes = attrs.field(validator=_check_sig_bytes, repr=False)

    def to_line(self) -> str:
        return f"{_SIG_PREFIX}{self.name} {_b64encode(self.key_hash + self.signature)}\n"

    @classmethod
    def from_line(cls, line: str) -> NoteSignature:
        """Parse one signature line (without its newline)."""
        if not line.startswith(_SIG_PREFIX):
            raise NoteError(f"note signature line {line!r:.80} does not start with '— '")
        name, sep, encoded = line[len(_SIG_PREFIX) :].partition(" ")
        if not sep:
            raise NoteError(f"note signature line {line!r:.80} has no signature")
        if not _is_valid_key_name(name):
            raise NoteError(f"note signature line {line!r:.80} has an invalid key name")
        raw = _b64decode(encoded)
        if raw is None:
            raise NoteError(f"note signature line {line!r:.80} is not valid base64")
        if len(raw) <= _KEY_HASH_SIZE:
            raise NoteError(f"note signature line {line!r:.80} is too short")
        return cls(name, raw[:_KEY_HASH_SIZE], raw[_KEY_HASH_SIZE:])


def _check_note_text(value: object) -> str:
    if not isinstance(value, str):
        raise NoteError(f"note text must be a str, got {type(value).__name__}")
    if not value.endswith("\n"):
        raise NoteError("note text must end with a newline")
    if _CONTROL.search(value):
        raise NoteError("note text contains an ASCII control character other than newline")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise NoteError("note text is not valid Unicode (lone surrogate)") from None
    if size > MAX_NOTE_SIZE:
        raise NoteError(f"note text is {size} bytes; the limit is {MAX_NOTE_SIZE}")
    return value


def _check_text_field(_: object, __: attrs.Attribute[str], value: str) -> None:
    _check_note_text(value)


def _check_signatures(
    _: object, __: attrs.Attribute[tuple[NoteSignature, ...]], value: object
) -> None:
    if not isinstance(value, tuple) or not all(isinstance(s, NoteSignature) for s in value):
        raise NoteError("note signatures must be a tuple of NoteSignature")
    if not 1 <= len(value) <= MAX_SIGNATURES:
        raise NoteError(f"a note has 1 to {MAX_SIGNATURES} signatures, got {len(value)}")


@attrs.frozen
class SignedNote:
    """A C2SP signed note: ``text`` (ending in newline) and its signature lines."""

    text: str = attrs.field(validator=_check_text_field)
    signatures: tuple[NoteSignature, ...] = attrs.field(validator=_check_signatures)

    def to_text(self) -> str:
        return self.text + "\n" + "".join(s.to_line() for s in self.signatures)

    def to_bytes(self) -> bytes:
        return self.to_text().encode("utf-8")

    @classmethod
    def parse(cls, data: str | bytes) -> SignedNote:
        """Parse a signed note strictly; anything malformed raises :class:`NoteError`.

        This does not verify any signature: see :func:`verify_note`.
        """
        if isinstance(data, (bytes, bytearray)):
            if len(data) > MAX_NOTE_SIZE:
                raise NoteError(f"note is {len(data)} bytes; the limit is {MAX_NOTE_SIZE}")
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                raise NoteError("note is not valid UTF-8") from None
        elif isinstance(data, str):
            if len(data) > MAX_NOTE_SIZE:  # cheap pre-check: UTF-8 is never shorter
                raise NoteError(f"note is over {MAX_NOTE_SIZE} bytes")
            text = data
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise NoteError("note is not valid Unicode (lone surrogate)") from None
            if size > MAX_NOTE_SIZE:
                raise NoteError(f"note is {size} bytes; the limit is {MAX_NOTE_SIZE}")
        else:
            raise NoteError(f"a note is str or bytes, got {type(data).__name__}")
        if _CONTROL.search(text):
            raise NoteError("note contains an ASCII control character other than newline")
        if not text.endswith("\n"):
            raise NoteError("note does not end with a newline")
        split = text.rfind("\n\n")
        if split < 0:
            raise NoteError("note has no blank line between its text and its signatures")
        body, block = text[: split + 1], text[split + 2 :]
        if not block:
            raise NoteError("note has no signature lines")
        lines = block[:-1].split("\n")
        if len(lines) > MAX_SIGNATURES:
            raise NoteError(f"note has {len(lines)} signatures; the limit is {MAX_SIGNATURES}")
        signatures = tuple(NoteSignature.from_line(line) for line in lines)
        return cls(body, signatures)


def key_hash(name: str, public_key: PublicKey) -> bytes:
    """The 4-byte C2SP key hash of an Ed25519 key:
    ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``."""
    _check_key_name(name)
    if not isinstance(public_key, PublicKey):
        raise KeyError_("key_hash needs a PublicKey")
    data = name.encode("utf-8") + b"\n" + bytes([ED25519_SIGNATURE_TYPE]) + public_key.raw
    return hashlib.sha256(data).digest()[:_KEY_HASH_SIZE]


def sign_note(text: str, signer: Signer, name: str) -> NoteSignature:
    """Sign note ``text`` with ``signer`` under key name ``name``."""
    _check_note_text(text)
    signature = signer.sign(text.encode("utf-8"))
    return NoteSignature(name, key_hash(name, signer.public_key), signature)


@attrs.frozen
class NoteVerifier:
    """A trusted note key: its ``name`` and Ed25519 ``public_key``."""

    name: str = attrs.field(validator=_check_sig_name)
    public_key: PublicKey = attrs.field()
    _verifier: Ed25519Verifier = attrs.field(init=False, eq=False, repr=False)
    key_hash: bytes = attrs.field(init=False, eq=False, repr=lambda h: h.hex())

    @public_key.validator
    def _check_public_key(self, _: attrs.Attribute[PublicKey], value: PublicKey) -> None:
        if not isinstance(value, PublicKey):
            raise KeyError_(f"a note verifier needs a PublicKey, got {type(value).__name__}")

    def __attrs_post_init__(self) -> None:
        try:
            verifier = Ed25519Verifier(self.public_key)
        except ValueError as exc:
            raise KeyError_(f"unusable Ed25519 public key: {exc}") from None
        object.__setattr__(self, "_verifier", verifier)
        object.__setattr__(self, "key_hash", key_hash(self.name, self.public_key))

    @classmethod
    def for_signer(cls, name: str, signer: Signer) -> NoteVerifier:
        return cls(name, signer.public_key)

    def matches(self, sig: NoteSignature) -> bool:
        """Whether ``sig`` claims to be from this key (same name and key hash)."""
        return sig.name == self.name and sig.key_hash == self.key_hash

    def verify(self, note_text: str, sig: NoteSignature) -> None:
        """Return ``None`` if ``sig`` is this key's valid signature over ``note_text``.

        Raises :class:`NoteError` if ``sig`` is not from this key or the text is
        malformed, :class:`SignatureError` if the signature does not verify.
        """
        if not self.matches(sig):
            raise NoteError(
                f"signature by {sig.name!r:.80} ({sig.key_hash.hex()}) is not from key"
                f" {self.name!r:.80} ({self.key_hash.hex()})"
            )
        _check_note_text(note_text)
        self._verifier.verify(sig.signature, note_text.encode("utf-8"))


def verify_note(
    note: SignedNote, verifiers: Sequence[NoteVerifier], threshold: int
) -> frozenset[str]:
    """Verify ``note`` against trusted keys; return the names of the keys that signed it.

    Signatures whose (name, key hash) match no verifier are ignored. A
    signature that matches a verifier but does not verify raises
    :class:`NoteError`, and so do fewer than ``threshold`` distinct key names
    with valid signatures. ``threshold`` must be at least 1 and at most the
    number of distinct verifier names (an empty or impossible policy is a
    :class:`ValueError`).
    """
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")
    if not isinstance(note, SignedNote):
        raise NoteError(f"verify_note needs a SignedNote, got {type(note).__name__}")
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for v in verifiers:
        if not isinstance(v, NoteVerifier):
            raise ValueError(f"verifiers must be NoteVerifier, got {type(v).__name__}")
        other = known.setdefault((v.name, v.key_hash), v)
        if other.public_key != v.public_key:
            raise ValueError(f"two verifiers share name {v.name!r} and key hash")
    names = {name for name, _ in known}
    if threshold > len(names):
        raise ValueError(
            f"threshold {threshold} exceeds the {len(names)} distinct verifier name(s)"
        )
    valid: set[str] = set()
    for sig in note.signatures:
        verifier = known.get((sig.name, sig.key_hash))
        if verifier is None:
            continue
        try:
            verifier.verify(note.text, sig)
        except SignatureError as exc:
            raise NoteError(f"signature by known key {sig.name!r} does not verify: {exc}") from None
        valid.add(sig.name)
    if len(valid) < threshold:
        raise NoteError(
            f"note has valid signatures from {len(valid)} of {len(names)} trusted keys;"
            f" {threshold} required"
        )
    return frozenset(valid)


def sign_checkpoint(cp: Checkpoint, signers: Sequence[tuple[str, Signer]]) -> SignedNote:
    """Sign checkpoint ``cp`` with every ``(key name, signer)`` pair."""
    if not signers:
        raise ValueError("sign_checkpoint needs at least one signer")
    text = cp.to_text()
    return SignedNote(text, tuple(sign_note(text, signer, name) for name, signer in signers))


def open_checkpoint(
    data: str | bytes,
    verifiers: Sequence[NoteVerifier],
    threshold: int,
    *,
    origin: str | None = None,
) -> tuple[Checkpoint, frozenset[str]]:
    """Parse a signed checkpoint note, verify it, then parse its body.

    Returns the checkpoint and the names of the keys whose signatures verified.
    With ``origin``, a checkpoint for another origin raises :class:`CheckpointError`.
    """
    note = SignedNote.parse(data)
    names = verify_note(note, verifiers, threshold)
    cp = Checkpoint.from_text(note.text)
    if origin is not None and cp.origin != origin:
        raise CheckpointError(f"checkpoint origin {cp.origin!r:.80} is not {origin!r:.80}")
    return cp, names
