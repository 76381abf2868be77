"""Peer messages: one canonical, signed envelope for every control message (DESIGN §6).

A frame is the RFC 8785 bytes of::

    {"v": 1, "type": "FIND_NODE", "from": <node id>, "key": <public key hex>,
     "addr": <sender's address>, "ts": <unix seconds>, "nonce": <32 hex>,
     "body": {...}, "sig": <Ed25519 signature hex over the same object without "sig">}

Replies are envelopes too, so a transport need not be trusted. :func:`open_frame`
checks everything a receiver must check -- size, shape, the signature, that the
node id is the key's, the time window -- and :class:`ReplayGuard` refuses a nonce
seen before. Blobs are not framed: they are content-addressed and re-verified.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

import attrs

from ._canonical import canonical_json, canonical_loads
from ._identity import Ed25519Verifier, PublicKey, Signer
from .errors import EncodingError, KeyError_, PeerMisbehaved, SignatureError

__all__ = [
    "MAX_FRAME_BYTES",
    "MESSAGE_TYPES",
    "Envelope",
    "ReplayGuard",
    "open_frame",
    "seal",
]

MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
MAX_SMALL_FRAME: Final = 256 * 1024
#: Messages whose bodies may be large (block ranges); every other frame is capped small.
LARGE_TYPES: Final = frozenset({"BLOCKS", "NEW_BLOCK", "GENESIS", "CONSENSUS", "PENDING"})
#: Messages that may carry bulk bytes after the envelope (see :func:`seal`).
ATTACHMENT_TYPES: Final = frozenset({"BLOCKS", "CONSENSUS", "PENDING"})
ATTACHMENT: Final = "attachment"
MESSAGE_TYPES: Final = frozenset(
    {
        "PING", "PONG",
        "FIND_NODE", "NODES",
        "GET_PROVIDERS", "PROVIDERS",
        "ADD_PROVIDER", "OK",
        "GET_HEAD", "HEAD",
        "GET_GENESIS", "GENESIS",
        "GET_BLOCKS", "BLOCKS",
        "NEW_BLOCK",
        "BUILD_REQUEST", "BUILD_STATUS", "GET_BUILD",
        "CONSENSUS", "PENDING", "VOUCH",
        "GET_PARTS", "PARTS",
        "ERROR",
    }
)
MAX_SKEW: Final = 300
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_NONCE: Final = re.compile(r"[0-9a-f]{32}")
_FIELDS: Final = frozenset({"v", "type", "from", "key", "addr", "ts", "nonce", "body", "sig"})


@attrs.frozen
class Envelope:
    """A verified message: who sent it, from where, when, and its body."""

    type: str
    sender: str  # node id
    public_key: PublicKey
    address: str
    timestamp: int
    nonce: str
    body: Mapping[str, Any]
    raw: bytes = attrs.field(repr=False, eq=False)
    #: Bulk bytes sent after the signed envelope; the signature covers their SHA-256.
    attachment: bytes | None = attrs.field(default=None, repr=False, eq=False)


def seal(
    signer: Signer,
    type_: str,
    body: Mapping[str, Any],
    *,
    address: str,
    now: float,
    nonce: str | None = None,
    attachment: bytes | None = None,
) -> bytes:
    """Sign and encode a message from this node.

    ``attachment`` (only for :data:`ATTACHMENT_TYPES`) is bulk data sent as is after the
    envelope and a newline (canonical JSON never holds a raw newline); the signed body
    names its SHA-256 and size, so it is covered by the signature without being
    re-encoded as JSON on either side.
    """
    if type_ not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {type_!r}")
    body = dict(body)
    if attachment is not None:
        if type_ not in ATTACHMENT_TYPES:
            raise ValueError(f"{type_} messages carry no attachment")
        body[ATTACHMENT] = {
            "sha256": hashlib.sha256(attachment).hexdigest(),
            "size": len(attachment),
        }
    envelope: dict[str, Any] = {
        "v": 1,
        "type": type_,
        "from": signer.node_id,
        "key": signer.public_key.hex,
        "addr": address,
        "ts": int(now),
        "nonce": nonce or secrets.token_hex(16),
        "body": body,
    }
    envelope["sig"] = signer.sign(canonical_json(envelope)).hex()
    frame = canonical_json(envelope)
    return frame if attachment is None else frame + b"\n" + attachment


def _bad(peer: str, reason: str) -> PeerMisbehaved:
    return PeerMisbehaved(peer or "<unknown>", reason)


def open_frame(
    frame: bytes,
    *,
    now: float,
    expect: frozenset[str] | set[str] | None = None,
    max_skew: int = MAX_SKEW,
) -> Envelope:
    """Decode and verify a frame; raise :class:`PeerMisbehaved` saying what is wrong.

    Checks: size cap, canonical JSON, exact fields and types, known type (and one of
    ``expect``), node id = SHA-256 of the key, signature, timestamp within ``max_skew``.
    """
    if not isinstance(frame, (bytes, bytearray)):
        raise _bad("", "frame is not bytes")
    if len(frame) > MAX_FRAME_BYTES:
        raise _bad("", f"frame of {len(frame)} bytes is larger than {MAX_FRAME_BYTES}")
    frame = bytes(frame)
    cut = frame.find(b"\n")
    head, attachment = (frame, None) if cut < 0 else (frame[:cut], frame[cut + 1 :])
    try:
        data: Any = canonical_loads(head, require_canonical=True)
    except EncodingError as exc:
        raise _bad("", f"frame is not canonical JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != _FIELDS:
        raise _bad("", "frame does not have exactly the envelope fields")
    sender = data["from"]
    if not isinstance(sender, str) or not _HEX64.fullmatch(sender):
        raise _bad("", "frame sender is not a node id")
    type_ = data["type"]
    if data["v"] != 1 or not isinstance(type_, str) or type_ not in MESSAGE_TYPES:
        raise _bad(sender, f"unknown message version or type {str(type_)[:40]!r}")
    if expect is not None and type_ not in expect:
        raise _bad(sender, f"unexpected message type {type_}")
    if type_ not in LARGE_TYPES and len(frame) > MAX_SMALL_FRAME:
        raise _bad(sender, f"{type_} frame of {len(frame)} bytes is too large")
    if not isinstance(data["addr"], str) or len(data["addr"]) > 256:
        raise _bad(sender, "frame address is malformed")
    if type(data["ts"]) is not int or not isinstance(data["body"], dict):
        raise _bad(sender, "frame timestamp or body is malformed")
    if not isinstance(data["nonce"], str) or not _NONCE.fullmatch(data["nonce"]):
        raise _bad(sender, "frame nonce is malformed")
    try:
        key = PublicKey.from_hex(data["key"]) if isinstance(data["key"], str) else None
    except KeyError_:
        key = None
    if key is None or key.node_id != sender:
        raise _bad(sender, "frame key does not match the sender's node id")
    sig_hex = data.pop("sig")
    try:
        sig = bytes.fromhex(sig_hex) if isinstance(sig_hex, str) else b""
    except ValueError:
        sig = b""
    try:
        Ed25519Verifier(key).verify(sig, canonical_json(data))
    except SignatureError:
        raise _bad(sender, "frame signature does not verify") from None
    if abs(data["ts"] - now) > max_skew:
        raise _bad(sender, f"frame timestamp is {int(data['ts'] - now)} s off")
    _check_attachment(sender, type_, data["body"], attachment)
    return Envelope(
        type=type_,
        sender=sender,
        public_key=key,
        address=data["addr"],
        timestamp=data["ts"],
        nonce=data["nonce"],
        body=data["body"],
        raw=frame,
        attachment=attachment,
    )


def _check_attachment(
    sender: str, type_: str, body: Mapping[str, Any], attachment: bytes | None
) -> None:
    declared = body.get(ATTACHMENT)
    if attachment is None:
        if declared is not None:
            raise _bad(sender, "frame declares an attachment but carries none")
        return
    if type_ not in ATTACHMENT_TYPES:
        raise _bad(sender, f"{type_} frames carry no attachment")
    if (
        not isinstance(declared, dict)
        or set(declared) != {"sha256", "size"}
        or type(declared["size"]) is not int
        or not isinstance(declared["sha256"], str)
    ):
        raise _bad(sender, "frame attachment is not declared in its signed body")
    if declared["size"] != len(attachment):
        raise _bad(sender, f"attachment is {len(attachment)} bytes, not {declared['size']}")
    if hashlib.sha256(attachment).hexdigest() != declared["sha256"]:
        raise _bad(sender, "attachment does not match the SHA-256 in its signed body")


@attrs.define(eq=False)
class ReplayGuard:
    """Refuses a (sender, nonce) seen before, for as long as its frame could be accepted.

    Bounded by time, not by eviction: a frame is only accepted while its timestamp is
    within ``max_skew`` of now (:func:`open_frame`, and here again), so its nonce is kept
    until then and forgotten after -- every nonce of an acceptable frame is remembered,
    and flooding new nonces never pushes an old one out. Memory is bounded by refusing
    instead: at most ``max_per_sender`` remembered nonces per sender (a sender over it
    must slow down), and at most ``max_entries`` in all from untrusted senders (past it,
    only ``trusted`` senders -- peers the node has verified -- get in).
    """

    max_skew: int = MAX_SKEW
    max_entries: int = 200_000
    max_per_sender: int = 60_000
    _seen: set[tuple[str, str]] = attrs.Factory(set)
    #: (when to forget, (sender, nonce), trusted), in arrival order (= forget order).
    _queue: deque[tuple[float, tuple[str, str], bool]] = attrs.Factory(deque)
    _per_sender: dict[str, int] = attrs.Factory(dict)
    _untrusted: int = 0

    def check(self, envelope: Envelope, now: float, *, trusted: bool = False) -> None:
        """Remember ``envelope``'s nonce, or raise :class:`PeerMisbehaved` (replayed,
        outside the time window, or over a cap)."""
        sender = envelope.sender
        if abs(envelope.timestamp - now) > self.max_skew:
            raise PeerMisbehaved(sender, "message outside the replay window (too old or early)")
        self.expire(now)
        key = (sender, envelope.nonce)
        if key in self._seen:
            raise PeerMisbehaved(sender, "replayed message (nonce seen before)")
        count = self._per_sender.get(sender, 0)
        if count >= self.max_per_sender:
            raise PeerMisbehaved(sender, "too many messages in the replay window; slow down")
        if not trusted and self._untrusted >= self.max_entries:
            raise PeerMisbehaved(sender, "too many messages from unverified peers; try later")
        # Kept one window (2 x max_skew) after it arrived: its frame (timestamp at most
        # max_skew ahead of now) stops passing the time check before that. Arrival order
        # is forget order, so expiring is a pop from the queue's front.
        self._seen.add(key)
        self._queue.append((now + 2 * self.max_skew + 1, key, trusted))
        self._per_sender[sender] = count + 1
        if not trusted:
            self._untrusted += 1

    def __len__(self) -> int:
        return len(self._seen)

    def expire(self, now: float) -> None:
        """Forget nonces whose frames can no longer pass the time check."""
        queue = self._queue
        while queue and queue[0][0] < now:
            _, key, trusted = queue.popleft()
            self._seen.discard(key)
            sender = key[0]
            left = self._per_sender[sender] - 1
            if left:
                self._per_sender[sender] = left
            else:
                del self._per_sender[sender]
            if not trusted:
                self._untrusted -= 1
