"""Tendermint BFT consensus among the build nodes, one height at a time, sans-I/O (DESIGN §5).

This is Algorithm 1 of "The latest gossip on BFT consensus" (Buchman, Kwon and
Milosevic, 2018) as a deterministic state machine (STYLE P1-P4): signed messages
and ``now`` go in; messages to broadcast, at most one committed block, the reasons
inputs were ignored, and the next deadline come out. Nothing here sends, sleeps or
reads a clock.

* **Messages** (:class:`Proposal`, :class:`Prevote`, :class:`Precommit`, one
  :class:`Message` base) are frozen values, each signed by its sender's Ed25519 key
  over the RFC 8785 bytes of a dict naming the network (``origin``), so a message of
  one network never counts in another. A precommit for a block also carries the
  voter's C2SP note signature over that block's checkpoint
  (:func:`~pyrsia_core.block_checkpoint`): more than 2/3 of precommits for a block
  *are* its commit certificate, the note :meth:`Ledger.validate
  <pyrsia_core.Ledger.validate>` accepts.
* **The rules** are data: :data:`STEP_TRANSITIONS` (the only legal step changes),
  :data:`UPON_RULES` (the paper's ``upon`` clauses, by line number) and
  :data:`TIMEOUT_RULES` (its ``OnTimeout*`` functions). The machine re-evaluates the
  ``upon`` rules after every input until none fires.
* **Validity** of a proposed block = the ledger's rules
  (:meth:`Ledger.check_proposal <pyrsia_core.Ledger.check_proposal>` plus its Merkle
  root) and an injected ``build_check`` ("I rebuilt every artifact and got the same
  hashes"), which may answer ``None`` (not known yet): the machine then waits, asks
  again on every later input, and prevotes nil if the propose timeout comes first.
* **Gossip.** The paper assumes every message a correct process receives reaches every
  correct process. When the machine has not changed step for ``timeouts.rebroadcast``
  seconds it re-broadcasts its own messages (every round of the height) and every
  message it holds for its current and previous round; with a re-proposed block it
  relays the prevotes that justify it. Messages are deduplicated by signature.
* **Votes** are kept per (voter, value): as in the paper every message counts toward
  the value it names, so an equivocator's two votes both count (quorum intersection
  keeps that safe) and a relayed proof of lock always adds up. Conflicting messages are
  kept as :attr:`TendermintMachine.evidence`.
* **Crash safety.** :meth:`TendermintMachine.snapshot` returns the state a restarted
  validator needs to never sign two different messages for one (height, round, type):
  round, step, locked and valid values, every message it has signed, and its decision.
  The runtime persists it *before* it sends any output with a non-empty ``broadcast``.

Inputs are never trusted: a message with a bad signature, from a non-validator, for
another height, oversized or malformed is *ignored with a reason* in
:attr:`Output.ignored`, and no exception escapes :meth:`TendermintMachine.receive`.

Driving it (the runtime's loop, one machine per height ``ledger.height + 1``)::

    m = TendermintMachine(ledger, signer, ledger.validators, ledger.origin, height,
                          build_check=..., get_value=...)
    if stored snapshot for this height: m.restore(snapshot)
    out = m.start(clock.now())
    on every output: persist m.snapshot() if out.broadcast; send out.broadcast to the
        other validators; log out.ignored; if out.committed: ledger.append it, gossip
        it, drop the snapshot, and start the next height's machine
    on a consensus message: height == m.height -> m.receive(msg, now); a higher
        height -> keep it (FutureMessages) for that machine; a lower height -> the
        sender is behind: send it that committed block
    at m.next_deadline() (and when a build finishes): m.handle_timer(now)
    on a block from gossip/sync for this height (validated by ledger.append): drop m
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Final, Protocol

import attrs

from ._canonical import canonical_json, canonical_loads
from ._checkpoint import NoteSignature, SignedNote, key_hash, sign_note
from ._identity import Ed25519Verifier, PublicKey, Signer
from ._ledger import MAX_BLOCK_RECORDS, Block, CommittedBlock, ValidatorSet, block_checkpoint
from ._records import SignedRecord
from .errors import EncodingError, PyrsiaError, UsageError, VerificationError

__all__ = [
    "DOMAIN",
    "MAX_FUTURE_ROUNDS_PER_SENDER",
    "MAX_PROPOSALS_PER_ROUND",
    "MAX_PROPOSAL_BYTES",
    "MAX_ROUND",
    "MAX_VALIDATORS",
    "MAX_VOTE_BYTES",
    "STEP_TRANSITIONS",
    "TIMEOUT_RULES",
    "UPON_RULES",
    "ConsensusError",
    "FutureMessages",
    "LedgerView",
    "Message",
    "MessageError",
    "Output",
    "Precommit",
    "Prevote",
    "Proposal",
    "SignatureCache",
    "Step",
    "TendermintMachine",
    "TimeoutKind",
    "Timeouts",
    "Trigger",
    "UponRule",
    "message_from_bytes",
    "message_from_json",
    "proposer_of",
]

#: Domain separation for consensus signatures (with the network's origin).
DOMAIN: Final = "pyrsia-consensus/1"
#: Highest round number a message may carry.
MAX_ROUND: Final = 1_000_000
#: Largest encoded prevote or precommit we parse.
MAX_VOTE_BYTES: Final = 4096
#: Largest encoded proposal we parse (the peer wire format's frame cap).
MAX_PROPOSAL_BYTES: Final = 16 * 1024 * 1024
#: A commit certificate is one signed note, which carries at most 100 signatures.
MAX_VALIDATORS: Final = 100
#: Distinct proposals kept per round beyond those somebody voted for (an equivocating
#: proposer cannot make us store more).
MAX_PROPOSALS_PER_ROUND: Final = 2
#: Rounds ahead of ours for which one sender's messages are kept (the highest win).
MAX_FUTURE_ROUNDS_PER_SENDER: Final = 4

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_MESSAGE_KEYS: Final = {
    "proposal": {"type", "height", "round", "block", "valid_round", "proposer", "signature"},
    "prevote": {"type", "height", "round", "block_hash", "voter", "signature"},
    "precommit": {
        "type",
        "height",
        "round",
        "block_hash",
        "voter",
        "signature",
        "checkpoint_signature",
    },
}


class MessageError(VerificationError, ValueError):
    """A consensus message is malformed (the peer that sent it misbehaved)."""


class ConsensusError(UsageError):
    """The machine was misused: bad arguments, a snapshot of another height, an illegal
    step transition (a bug: it never follows from peer input)."""


# -- messages ----------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_height(_: object, __: attrs.Attribute[int], value: int) -> None:
    if not _is_int(value) or not 0 <= value <= 2**53 - 1:
        raise MessageError(f"message height must be a non-negative int, got {value!r:.40}")


def _check_round(_: object, __: attrs.Attribute[int], value: int) -> None:
    if not _is_int(value) or not 0 <= value <= MAX_ROUND:
        raise MessageError(f"message round must be an int in [0, {MAX_ROUND}], got {value!r:.40}")


def _check_node_id(_: object, attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise MessageError(f"message {attr.name} must be a node id (64 lowercase hex)")


def _check_block_hash(_: object, __: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not _HEX64.fullmatch(value)):
        raise MessageError("block_hash must be 64 lowercase hex or None (nil)")


def _check_signature(_: object, __: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) > 64:
        raise MessageError("a message signature is at most 64 bytes (empty = unsigned)")


@attrs.frozen
class Message:
    """A consensus message for ``(height, round)``. Closed set: don't subclass these."""

    TYPE: ClassVar[str] = ""

    height: int = attrs.field(validator=_check_height)
    round: int = attrs.field(validator=_check_round)
    #: (origin, signing bytes), computed once (a message is checked by many machines
    #: in a simulation, and signed then logged by its sender).
    _signing: tuple[str, bytes] | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @property
    def sender(self) -> str:
        """Node id of the validator that signed it."""
        raise NotImplementedError

    @property
    def signature_bytes(self) -> bytes:
        raise NotImplementedError

    def _body(self) -> dict[str, Any]:
        raise NotImplementedError

    def signing_bytes(self, origin: str) -> bytes:
        """The bytes the sender signs: canonical JSON naming the network and every field."""
        cached = self._signing
        if cached is not None and cached[0] == origin:
            return cached[1]
        data = canonical_json(
            {
                "domain": DOMAIN,
                "origin": origin,
                "type": self.TYPE,
                "height": self.height,
                "round": self.round,
                **self._body(),
            }
        )
        object.__setattr__(self, "_signing", (origin, data))
        return data

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, data: Any) -> Message:
        """Parse ``data`` (of this class's type, or of any type on :class:`Message`)."""
        message = message_from_json(data)
        if not isinstance(message, cls):
            raise MessageError(f"expected a {cls.TYPE}, got a {message.TYPE}")
        return message

    @classmethod
    def from_bytes(cls, data: bytes) -> Message:
        message = message_from_bytes(data)
        if not isinstance(message, cls):
            raise MessageError(f"expected a {cls.TYPE}, got a {message.TYPE}")
        return message


def _check_proposal_block(_: object, __: attrs.Attribute[Block], value: Block) -> None:
    if not isinstance(value, Block):
        raise MessageError("a proposal carries a Block")


@attrs.frozen
class Proposal(Message):
    """``<PROPOSAL, height, round, block, valid_round>`` from the round's proposer."""

    TYPE: ClassVar[str] = "proposal"

    block: Block = attrs.field(validator=_check_proposal_block, repr=False)
    valid_round: int = attrs.field()
    proposer: str = attrs.field(validator=_check_node_id)
    signature: bytes = attrs.field(default=b"", validator=_check_signature, repr=False)
    #: ``block.hash``, computed once.
    block_hash: str = attrs.field(init=False, eq=False)

    @valid_round.validator
    def _check_valid_round(self, _: attrs.Attribute[int], value: int) -> None:
        if not _is_int(value) or not -1 <= value < self.round:
            raise MessageError(f"valid_round must be -1 or in [0, round), got {value!r:.40}")

    def __attrs_post_init__(self) -> None:
        if self.block.height != self.height:
            raise MessageError(
                f"proposal for height {self.height} carries a block of height {self.block.height}"
            )
        object.__setattr__(self, "block_hash", self.block.hash)

    @property
    def sender(self) -> str:
        return self.proposer

    @property
    def signature_bytes(self) -> bytes:
        return self.signature

    def _body(self) -> dict[str, Any]:
        return {
            "block": self.block_hash,
            "valid_round": self.valid_round,
            "proposer": self.proposer,
        }

    def signed(self, signer: Signer, origin: str) -> Proposal:
        if signer.node_id != self.proposer:
            raise ConsensusError("a proposal is signed by its proposer")
        return attrs.evolve(self, signature=signer.sign(self.signing_bytes(origin)))

    @classmethod
    def create(
        cls,
        signer: Signer,
        origin: str,
        *,
        height: int,
        round: int,
        block: Block,
        valid_round: int = -1,
    ) -> Proposal:
        return cls(height, round, block, valid_round, signer.node_id).signed(signer, origin)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "height": self.height,
            "round": self.round,
            "block": self.block.to_json(),
            "valid_round": self.valid_round,
            "proposer": self.proposer,
            "signature": self.signature.hex(),
        }


@attrs.frozen
class Prevote(Message):
    """``<PREVOTE, height, round, id(v) | nil>``."""

    TYPE: ClassVar[str] = "prevote"

    block_hash: str | None = attrs.field(validator=_check_block_hash)
    voter: str = attrs.field(validator=_check_node_id)
    signature: bytes = attrs.field(default=b"", validator=_check_signature, repr=False)

    @property
    def sender(self) -> str:
        return self.voter

    @property
    def signature_bytes(self) -> bytes:
        return self.signature

    def _body(self) -> dict[str, Any]:
        return {"block_hash": self.block_hash, "voter": self.voter}

    def signed(self, signer: Signer, origin: str) -> Prevote:
        if signer.node_id != self.voter:
            raise ConsensusError("a vote is signed by its voter")
        return attrs.evolve(self, signature=signer.sign(self.signing_bytes(origin)))

    @classmethod
    def create(
        cls, signer: Signer, origin: str, *, height: int, round: int, block_hash: str | None
    ) -> Prevote:
        return cls(height, round, block_hash, signer.node_id).signed(signer, origin)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "height": self.height,
            "round": self.round,
            "block_hash": self.block_hash,
            "voter": self.voter,
            "signature": self.signature.hex(),
        }


def _check_checkpoint_signature(
    _: object, __: attrs.Attribute[NoteSignature | None], value: NoteSignature | None
) -> None:
    if value is not None and not isinstance(value, NoteSignature):
        raise MessageError("checkpoint_signature must be a NoteSignature or None")


@attrs.frozen
class Precommit(Message):
    """``<PRECOMMIT, height, round, id(v) | nil>``; for a block, with the voter's note
    signature over the block's checkpoint (its share of the commit certificate)."""

    TYPE: ClassVar[str] = "precommit"

    block_hash: str | None = attrs.field(validator=_check_block_hash)
    voter: str = attrs.field(validator=_check_node_id)
    signature: bytes = attrs.field(default=b"", validator=_check_signature, repr=False)
    checkpoint_signature: NoteSignature | None = attrs.field(
        default=None, validator=_check_checkpoint_signature, repr=False
    )

    def __attrs_post_init__(self) -> None:
        if (self.block_hash is None) != (self.checkpoint_signature is None):
            raise MessageError(
                "a precommit for a block carries a checkpoint signature, and a nil one none"
            )

    @property
    def sender(self) -> str:
        return self.voter

    @property
    def signature_bytes(self) -> bytes:
        return self.signature

    def _cp_line(self) -> str | None:
        sig = self.checkpoint_signature
        return None if sig is None else sig.to_line()[:-1]

    def _body(self) -> dict[str, Any]:
        return {
            "block_hash": self.block_hash,
            "voter": self.voter,
            "checkpoint_signature": self._cp_line(),
        }

    def signed(self, signer: Signer, origin: str) -> Precommit:
        if signer.node_id != self.voter:
            raise ConsensusError("a vote is signed by its voter")
        return attrs.evolve(self, signature=signer.sign(self.signing_bytes(origin)))

    @classmethod
    def create(
        cls, signer: Signer, origin: str, *, height: int, round: int, block: Block | None
    ) -> Precommit:
        """Precommit ``block`` (or nil), signing its checkpoint under ``<origin>/<node id>``."""
        if block is None:
            return cls(height, round, None, signer.node_id).signed(signer, origin)
        note_sig = sign_note(
            block_checkpoint(origin, block).to_text(), signer, f"{origin}/{signer.node_id}"
        )
        return cls(height, round, block.hash, signer.node_id, b"", note_sig).signed(signer, origin)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "height": self.height,
            "round": self.round,
            "block_hash": self.block_hash,
            "voter": self.voter,
            "signature": self.signature.hex(),
            "checkpoint_signature": self._cp_line(),
        }


def _signature_from_hex(value: object) -> bytes:
    if not isinstance(value, str) or len(value) != 128:
        raise MessageError("message signature must be 128 hex characters")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise MessageError("message signature is not hex") from None
    if raw.hex() != value:
        raise MessageError("message signature hex must be lowercase")
    return raw


def message_from_json(data: Any) -> Message:
    """Parse a decoded message; anything malformed raises :class:`MessageError`."""
    if not isinstance(data, Mapping):
        raise MessageError("a consensus message is a JSON object")
    kind = data.get("type")
    keys = _MESSAGE_KEYS.get(kind) if isinstance(kind, str) else None
    if keys is None:
        raise MessageError(f"unknown consensus message type {str(kind)[:40]!r}")
    if set(data) != keys:
        missing = sorted(keys - set(data))
        extra = sorted(str(k)[:40] for k in set(data) - keys)
        raise MessageError(f"{kind} fields wrong: missing {missing}, unknown {extra}")
    signature = _signature_from_hex(data["signature"])
    try:
        if kind == "proposal":
            block = Block.from_json(data["block"])
            return Proposal(
                data["height"],
                data["round"],
                block,
                data["valid_round"],
                data["proposer"],
                signature,
            )
        if kind == "prevote":
            return Prevote(
                data["height"], data["round"], data["block_hash"], data["voter"], signature
            )
        line = data["checkpoint_signature"]
        if line is not None and (not isinstance(line, str) or len(line) > 1024):
            raise MessageError("checkpoint_signature must be a note signature line or null")
        note_sig = None if line is None else NoteSignature.from_line(line)
        return Precommit(
            data["height"], data["round"], data["block_hash"], data["voter"], signature, note_sig
        )
    except MessageError:
        raise
    except (VerificationError, ValueError, TypeError) as exc:
        raise MessageError(f"malformed {kind}: {exc}") from None


def message_from_bytes(data: bytes) -> Message:
    """Decode a message from its canonical bytes, with size caps per type."""
    if not isinstance(data, (bytes, bytearray)):
        raise MessageError("a consensus message is bytes")
    if len(data) > MAX_PROPOSAL_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds {MAX_PROPOSAL_BYTES}")
    try:
        decoded = canonical_loads(bytes(data), require_canonical=True)
    except EncodingError as exc:
        raise MessageError(f"message is not canonical JSON: {exc}") from None
    msg = message_from_json(decoded)
    if not isinstance(msg, Proposal) and len(data) > MAX_VOTE_BYTES:
        raise MessageError(f"{msg.TYPE} of {len(data)} bytes exceeds {MAX_VOTE_BYTES}")
    return msg


# -- helpers the machine is given --------------------------------------------------


class LedgerView(Protocol):
    """What the machine asks of the ledger (a :class:`~pyrsia_core.Ledger` fits).

    The ledger must not change while the machine for its next height runs.
    """

    def check_proposal(self, block: Block, *, now: float | None = None) -> None: ...

    def root_after(self, records: Sequence[SignedRecord]) -> tuple[int, str]: ...


@attrs.define(eq=False)
class SignatureCache:
    """Ed25519 verification that remembers successes (by key, signature and payload).

    One machine deduplicates messages itself; a cache shared by several machines (a
    simulation, or a node checking relayed copies) verifies each signature once.
    """

    max_entries: int = 200_000
    _ok: dict[bytes, None] = attrs.Factory(dict)
    _verifiers: dict[bytes, Ed25519Verifier] = attrs.Factory(dict)

    def verify(self, key: PublicKey, signature: bytes, payload: bytes) -> bool:
        """Whether ``signature`` is ``key``'s over ``payload``; never raises."""
        if len(signature) != 64:
            return False
        digest = hashlib.sha256(key.raw + signature + payload).digest()
        if digest in self._ok:
            return True
        verifier = self._verifiers.get(key.raw)
        if verifier is None:
            try:
                verifier = Ed25519Verifier(key)
            except (ValueError, PyrsiaError):
                return False
            if len(self._verifiers) >= 4096:
                self._verifiers.clear()
            self._verifiers[key.raw] = verifier
        try:
            verifier.verify(signature, payload)
        except PyrsiaError:
            return False
        if len(self._ok) >= self.max_entries:
            for old in list(self._ok)[: self.max_entries // 2]:
                del self._ok[old]
        self._ok[digest] = None
        return True


@attrs.define(eq=False)
class FutureMessages:
    """Messages for heights this node has not reached, kept (bounded) until it does.

    A node a little behind would otherwise drop the next height's proposal. Nothing
    is verified here: the machine of that height checks each message when it is fed.
    """

    max_ahead: int = 2
    max_messages: int = 4096
    _by_height: dict[int, list[Message]] = attrs.Factory(dict)
    _count: int = 0

    def add(self, message: Message, current_height: int) -> str | None:
        """Keep ``message``; return why not if it is refused."""
        if not current_height < message.height <= current_height + self.max_ahead:
            return f"height {message.height} is not within {self.max_ahead} of {current_height}"
        if self._count >= self.max_messages:
            return "future-message buffer is full"
        self._by_height.setdefault(message.height, []).append(message)
        self._count += 1
        return None

    def take(self, height: int) -> list[Message]:
        """The messages kept for ``height``; forget those and every lower height."""
        out = self._by_height.pop(height, [])
        for h in [h for h in self._by_height if h < height]:
            self._count -= len(self._by_height.pop(h))
        self._count -= len(out)
        return out

    def __len__(self) -> int:
        return self._count


def proposer_of(validators: ValidatorSet, height: int, round: int) -> str:
    """The proposer of ``(height, round)``: deterministic rotation over the ordered set."""
    ordered = validators.ordered()
    return ordered[(height + round) % len(ordered)]


def _check_positive(_: object, attr: attrs.Attribute[float], value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConsensusError(f"timeout {attr.name} must be a positive number, got {value!r}")


def _check_non_negative(_: object, attr: attrs.Attribute[float], value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ConsensusError(f"timeout {attr.name} must be a non-negative number, got {value!r}")


class TimeoutKind(enum.Enum):
    PROPOSE = "propose"
    PREVOTE = "prevote"
    PRECOMMIT = "precommit"


@attrs.frozen
class Timeouts:
    """Seconds; the timeout of round ``r`` is ``base + r * delta`` (growing per round)."""

    propose: float = attrs.field(default=3.0, validator=_check_positive)
    propose_delta: float = attrs.field(default=0.5, validator=_check_non_negative)
    prevote: float = attrs.field(default=1.0, validator=_check_positive)
    prevote_delta: float = attrs.field(default=0.5, validator=_check_non_negative)
    precommit: float = attrs.field(default=1.0, validator=_check_positive)
    precommit_delta: float = attrs.field(default=0.5, validator=_check_non_negative)
    #: Re-broadcast what we hold after this long without a step change.
    rebroadcast: float = attrs.field(default=2.0, validator=_check_positive)
    #: While waiting on ``get_value`` or a ``build_check``, ask again this often.
    poll: float = attrs.field(default=0.1, validator=_check_positive)

    def of(self, kind: TimeoutKind, round: int) -> float:
        if kind is TimeoutKind.PROPOSE:
            return self.propose + round * self.propose_delta
        if kind is TimeoutKind.PREVOTE:
            return self.prevote + round * self.prevote_delta
        return self.precommit + round * self.precommit_delta


# -- the rules as data ---------------------------------------------------------------


class Step(enum.Enum):
    NEW = "new"  # constructed, not started
    PROPOSE = "propose"
    PREVOTE = "prevote"
    PRECOMMIT = "precommit"
    DECIDED = "decided"  # terminal: this height has its block


class Trigger(enum.Enum):
    START_ROUND = "start-round"  # StartRound(r): start, line 55, OnTimeoutPrecommit
    SEND_PREVOTE = "send-prevote"  # lines 22 and 28, OnTimeoutPropose
    SEND_PRECOMMIT = "send-precommit"  # lines 36 and 44, OnTimeoutPrevote
    DECIDE = "decide"  # line 49


_ACTIVE: Final = frozenset({Step.PROPOSE, Step.PREVOTE, Step.PRECOMMIT})

#: Every legal step change; anything else raises :class:`ConsensusError`.
STEP_TRANSITIONS: Final[Mapping[tuple[Step, Trigger], Step]] = MappingProxyType(
    {
        (Step.NEW, Trigger.START_ROUND): Step.PROPOSE,
        (Step.PROPOSE, Trigger.START_ROUND): Step.PROPOSE,
        (Step.PREVOTE, Trigger.START_ROUND): Step.PROPOSE,
        (Step.PRECOMMIT, Trigger.START_ROUND): Step.PROPOSE,
        (Step.PROPOSE, Trigger.SEND_PREVOTE): Step.PREVOTE,
        (Step.PREVOTE, Trigger.SEND_PRECOMMIT): Step.PRECOMMIT,
        (Step.PROPOSE, Trigger.DECIDE): Step.DECIDED,
        (Step.PREVOTE, Trigger.DECIDE): Step.DECIDED,
        (Step.PRECOMMIT, Trigger.DECIDE): Step.DECIDED,
    }
)

#: Algorithm 1 lines 57-67: a timeout of ``(height, round)`` acts only if the machine
#: is still in that round and in one of these steps, and then fires this trigger
#: (prevote nil, precommit nil, or StartRound(round + 1)).
TIMEOUT_RULES: Final[Mapping[TimeoutKind, tuple[frozenset[Step], Trigger]]] = MappingProxyType(
    {
        TimeoutKind.PROPOSE: (frozenset({Step.PROPOSE}), Trigger.SEND_PREVOTE),
        TimeoutKind.PREVOTE: (frozenset({Step.PREVOTE}), Trigger.SEND_PRECOMMIT),
        TimeoutKind.PRECOMMIT: (_ACTIVE, Trigger.START_ROUND),
    }
)


@attrs.frozen
class UponRule:
    """One ``upon`` clause: the steps it may fire in, and its effect.

    ``fire`` applies the clause if its condition holds and returns whether it did.
    """

    line: int
    summary: str
    steps: frozenset[Step]
    fire: Callable[[TendermintMachine, _Outbox], bool] = attrs.field(repr=False)


@attrs.frozen
class Output:
    """What one input produced."""

    #: Messages to send to every validator (and to relay), in order.
    broadcast: list[Message] = attrs.Factory(list)
    #: The height's block and its certificate, once decided.
    committed: CommittedBlock | None = None
    #: Inputs (or ``None`` for an internal event) dropped, with the reason.
    ignored: list[tuple[Message | None, str]] = attrs.Factory(list)


@attrs.define(eq=False)
class _Outbox:
    broadcast: list[Message] = attrs.Factory(list)
    committed: CommittedBlock | None = None
    ignored: list[tuple[Message | None, str]] = attrs.Factory(list)

    def freeze(self) -> Output:
        # One input may re-send a message more than once (a restored vote, a relayed
        # proof of lock); the peers need it once.
        unique = list({id(m): m for m in self.broadcast}.values())
        return Output(unique, self.committed, list(self.ignored))


@attrs.define(eq=False)
class _RoundLog:
    """Everything accepted for one round.

    Votes are kept per (voter, block hash): as in the paper, every message counts
    toward the value it names, so an equivocator's two votes both count (quorum
    intersection keeps that safe) and a relayed proof of lock always adds up.
    """

    proposals: dict[str, Proposal] = attrs.Factory(dict)  # block hash -> first proposal
    prevotes: dict[tuple[str, str | None], Prevote] = attrs.Factory(dict)
    precommits: dict[tuple[str, str | None], Precommit] = attrs.Factory(dict)
    #: Distinct voters (for the "2f+1 of any value" rules).
    prevoters: set[str] = attrs.Factory(set)
    precommitters: set[str] = attrs.Factory(set)
    prevote_tally: dict[str | None, int] = attrs.Factory(dict)
    #: block hash -> voter -> checkpoint signature that verified against the block.
    certs: dict[str, dict[str, NoteSignature]] = attrs.Factory(dict)
    #: (voter, hash) -> precommit whose block we have not seen (note not yet verified).
    unverified: dict[tuple[str, str], Precommit] = attrs.Factory(dict)

    def senders(self) -> set[str]:
        out = self.prevoters | self.precommitters
        out.update(p.proposer for p in self.proposals.values())
        return out

    def has_sender(self, node_id: str) -> bool:
        return (
            node_id in self.prevoters
            or node_id in self.precommitters
            or any(p.proposer == node_id for p in self.proposals.values())
        )

    def votes_of(self, voter: str, kind: str) -> list[Message]:
        table: Mapping[tuple[str, str | None], Message] = (
            self.prevotes if kind == Prevote.TYPE else self.precommits
        )
        return [m for (v, _), m in table.items() if v == voter]

    def messages(self) -> Iterator[Message]:
        yield from self.proposals.values()
        yield from self.prevotes.values()
        yield from self.precommits.values()

    def add_prevote(self, vote: Prevote) -> None:
        self.prevotes[(vote.voter, vote.block_hash)] = vote
        self.prevoters.add(vote.voter)
        self.prevote_tally[vote.block_hash] = self.prevote_tally.get(vote.block_hash, 0) + 1

    def add_precommit(self, vote: Precommit, *, verified_note: bool) -> None:
        self.precommits[(vote.voter, vote.block_hash)] = vote
        self.precommitters.add(vote.voter)
        if vote.block_hash is not None and vote.checkpoint_signature is not None:
            if verified_note:
                self.certs.setdefault(vote.block_hash, {})[vote.voter] = vote.checkpoint_signature
            else:
                self.unverified[(vote.voter, vote.block_hash)] = vote

    def drop_sender(self, node_id: str) -> list[Message]:
        """Forget everything ``node_id`` sent in this round; return what was dropped."""
        dropped: list[Message] = []
        for h in [h for h, p in self.proposals.items() if p.proposer == node_id]:
            dropped.append(self.proposals.pop(h))
        for key in [k for k in self.prevotes if k[0] == node_id]:
            prevote = self.prevotes.pop(key)
            dropped.append(prevote)
            self.prevote_tally[prevote.block_hash] -= 1
        for key in [k for k in self.precommits if k[0] == node_id]:
            precommit = self.precommits.pop(key)
            dropped.append(precommit)
            if precommit.block_hash is not None:
                self.unverified.pop((node_id, precommit.block_hash), None)
                self.certs.get(precommit.block_hash, {}).pop(node_id, None)
        self.prevoters.discard(node_id)
        self.precommitters.discard(node_id)
        return dropped


@attrs.define(eq=False)
class TendermintMachine:
    """Tendermint for one height (Algorithm 1); the runtime makes one per height.

    ``ledger_view`` is the ledger at ``height - 1`` (unchanged while this runs),
    ``validators`` the validator set in force at ``height`` and ``origin`` the
    network's. ``get_value(now)`` returns the block this node would propose (from its
    pending records) or ``None``; ``build_check(block)`` answers whether this node
    rebuilt every artifact of ``block`` and got the same hashes (``None``: not known
    yet). ``now`` is wall-clock seconds (it also bounds block timestamps).
    """

    ledger_view: LedgerView
    signer: Signer
    validators: ValidatorSet
    origin: str
    height: int
    timeouts: Timeouts = attrs.Factory(Timeouts)
    build_check: Callable[[Block], bool | None] = lambda _block: True
    get_value: Callable[[float], Block | None] = lambda _now: None
    signature_cache: SignatureCache = attrs.Factory(SignatureCache)
    max_block_records: int = MAX_BLOCK_RECORDS

    round: int = attrs.field(init=False, default=0)
    step: Step = attrs.field(init=False, default=Step.NEW)
    locked_round: int = attrs.field(init=False, default=-1)
    locked_block: Block | None = attrs.field(init=False, default=None)
    valid_round: int = attrs.field(init=False, default=-1)
    valid_block: Block | None = attrs.field(init=False, default=None)
    decision: CommittedBlock | None = attrs.field(init=False, default=None)
    #: Pairs of conflicting messages from one validator for one (round, type).
    evidence: list[tuple[Message, Message]] = attrs.field(init=False, factory=list)

    _me: str = attrs.field(init=False, default="")
    _quorum: int = attrs.field(init=False, default=0)
    _skip: int = attrs.field(init=False, default=0)
    _keys: dict[str, PublicKey] = attrs.field(init=False, factory=dict)
    _note_keys: dict[str, tuple[str, bytes]] = attrs.field(init=False, factory=dict)
    _now: float = attrs.field(init=False, default=0.0)
    _rounds: dict[int, _RoundLog] = attrs.field(init=False, factory=dict)
    _blocks: dict[str, Block] = attrs.field(init=False, factory=dict)
    _seen: set[bytes] = attrs.field(init=False, factory=set)
    _sent: dict[tuple[str, int], Message] = attrs.field(init=False, factory=dict)
    _fired: set[tuple[int, int]] = attrs.field(init=False, factory=set)
    _timers: list[tuple[float, int, TimeoutKind, int]] = attrs.field(init=False, factory=list)
    _timer_seq: int = attrs.field(init=False, default=0)
    _next_rebroadcast: float | None = attrs.field(init=False, default=None)
    _next_poll: float | None = attrs.field(init=False, default=None)
    _awaiting_value: bool = attrs.field(init=False, default=False)
    _ledger_ok: dict[str, bool] = attrs.field(init=False, factory=dict)
    _build_ok: dict[str, bool] = attrs.field(init=False, factory=dict)
    _build_pending: bool = attrs.field(init=False, default=False)
    _restored_step: Step | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        n = len(self.validators)
        if not 1 <= n <= MAX_VALIDATORS:
            raise ConsensusError(f"a validator set has 1 to {MAX_VALIDATORS} members, got {n}")
        self._me = self.signer.node_id
        if self._me not in self.validators:
            raise ConsensusError("this node is not a validator at this height")
        if not _is_int(self.height) or self.height < 1:
            raise ConsensusError("consensus decides heights >= 1 (genesis is configured)")
        self._quorum = self.validators.threshold  # 2f + 1
        self._skip = n - self._quorum + 1  # f + 1: at least one correct sender
        self._keys = dict(self.validators.members)

    # -- queries -----------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._me

    def proposer(self, round: int) -> str:
        return proposer_of(self.validators, self.height, round)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` should next be called (``None``: only on input)."""
        if self.step in (Step.NEW, Step.DECIDED):
            return None
        candidates = [t[0] for t in self._timers[:1]]
        if self._next_rebroadcast is not None:
            candidates.append(self._next_rebroadcast)
        if self._next_poll is not None and (self._awaiting_value or self._build_pending):
            candidates.append(self._next_poll)
        return min(candidates) if candidates else None

    # -- inputs --------------------------------------------------------------------

    def start(self, now: float) -> Output:
        """Start round 0 (or resume the restored round). Idempotent."""
        out = _Outbox()
        self._now = now
        if self.step is Step.NEW:
            self._begin(out)
            self._settle(out)
        return out.freeze()

    def receive(self, message: Message, now: float) -> Output:
        """Feed one message from a peer. Never raises for bad input: see ``ignored``."""
        out = _Outbox()
        self._now = now
        began = self.step is Step.NEW
        if began:
            self._begin(out)
        reason = self._admit(message, out)
        if reason is not None:
            out.ignored.append((message, reason))
        if reason is None or began:  # an ignored message changes no state
            self._settle(out)
        return out.freeze()

    def receive_bytes(self, data: bytes, now: float) -> Output:
        """Decode (size-capped) and :meth:`receive` a message."""
        try:
            message = message_from_bytes(data)
        except MessageError as exc:
            return Output(ignored=[(None, f"malformed message: {exc}")])
        return self.receive(message, now)

    def handle_timer(self, now: float) -> Output:
        """Fire every timeout due at ``now``; also re-asks pending checks and values."""
        out = _Outbox()
        self._now = now
        if self.step is Step.NEW:
            self._begin(out)
        while self._timers and self._timers[0][0] <= now and self.step in _ACTIVE:
            _, _, kind, round = heapq.heappop(self._timers)
            steps, trigger = TIMEOUT_RULES[kind]
            if round == self.round and self.step in steps:
                self._on_timeout(trigger, out)
                self._settle(out)
        if self.step in _ACTIVE:
            if self._next_poll is not None and now >= self._next_poll:
                self._next_poll = None
                if self._awaiting_value and self.step is Step.PROPOSE:
                    self._propose(out)
            if self._next_rebroadcast is not None and now >= self._next_rebroadcast:
                out.broadcast.extend(self._gossip())
                self._next_rebroadcast = now + self.timeouts.rebroadcast
        self._settle(out)
        return out.freeze()

    # -- persistence ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What a restarted validator needs not to equivocate (canonical-JSON-able)."""
        return {
            "version": 1,
            "origin": self.origin,
            "height": self.height,
            "round": self.round,
            "step": self.step.value,
            "locked_round": self.locked_round,
            "locked_block": None if self.locked_block is None else self.locked_block.to_json(),
            "valid_round": self.valid_round,
            "valid_block": None if self.valid_block is None else self.valid_block.to_json(),
            "sent": [m.to_json() for m in self._sent.values()],
            "decision": None if self.decision is None else self.decision.to_json(),
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Adopt a :meth:`snapshot` of this height before :meth:`start`.

        Raises :class:`ConsensusError` if it is malformed or of another height/network.
        """
        if self.step is not Step.NEW:
            raise ConsensusError("restore() comes before start()")
        keys = {
            "version",
            "origin",
            "height",
            "round",
            "step",
            "locked_round",
            "locked_block",
            "valid_round",
            "valid_block",
            "sent",
            "decision",
        }
        if not isinstance(snapshot, Mapping) or set(snapshot) != keys:
            raise ConsensusError("not a consensus snapshot")
        if snapshot["version"] != 1 or snapshot["origin"] != self.origin:
            raise ConsensusError("snapshot is of another version or network")
        if snapshot["height"] != self.height:
            raise ConsensusError(
                f"snapshot is for height {snapshot['height']!r}, not {self.height}"
            )
        try:
            step = Step(snapshot["step"])
            round = snapshot["round"]
            locked_round = snapshot["locked_round"]
            valid_round = snapshot["valid_round"]
            for value, low in ((round, 0), (locked_round, -1), (valid_round, -1)):
                if not _is_int(value) or not low <= value <= MAX_ROUND:
                    raise ConsensusError(f"snapshot round {value!r} is out of range")
            locked = snapshot["locked_block"]
            valid = snapshot["valid_block"]
            locked_block = None if locked is None else Block.from_json(locked)
            valid_block = None if valid is None else Block.from_json(valid)
            if (locked_block is None) != (locked_round == -1) or (valid_block is None) != (
                valid_round == -1
            ):
                raise ConsensusError("snapshot lock/valid rounds and blocks disagree")
            if not isinstance(snapshot["sent"], list):
                raise ConsensusError("snapshot 'sent' is a list of messages")
            sent = [message_from_json(m) for m in snapshot["sent"]]
            decided = snapshot["decision"]
            decision = None if decided is None else CommittedBlock.from_json(decided)
        except (VerificationError, ValueError, TypeError) as exc:
            raise ConsensusError(f"snapshot is malformed: {exc}") from None
        if (step is Step.DECIDED) != (decision is not None) or (
            decision is not None and decision.block.height != self.height
        ):
            raise ConsensusError("snapshot step and decision disagree")
        for m in sent:
            if m.sender != self.node_id or m.height != self.height:
                raise ConsensusError("snapshot holds a message not signed by this node")
        self.round = round
        self._restored_step = step
        self.decision = decision
        self.locked_round, self.locked_block = locked_round, locked_block
        self.valid_round, self.valid_block = valid_round, valid_block
        if locked_block is not None:
            self._blocks[locked_block.hash] = locked_block
        if valid_block is not None:
            self._blocks[valid_block.hash] = valid_block
        for m in sent:
            self._sent[(m.TYPE, m.round)] = m
            self._record(m, verified_note=True)

    # -- internals: starting, timers, transitions ---------------------------------

    def _begin(self, out: _Outbox) -> None:
        restored = self._restored_step
        self._restored_step = None
        if restored is None or restored in (Step.NEW, Step.PROPOSE):
            self._start_round(self.round, out)
            return
        # Resume a restored round by replaying its steps through the table (nothing is
        # signed: our messages of the round are in the log already).
        self._transition(Trigger.START_ROUND)
        if restored is Step.DECIDED:
            # Crashed between deciding and appending: hand the decision out again.
            self._transition(Trigger.DECIDE)
            out.committed = self.decision
            return
        self._transition(Trigger.SEND_PREVOTE)
        if restored is Step.PRECOMMIT:
            self._transition(Trigger.SEND_PRECOMMIT)
        # Re-send what we signed in this round. The peers' messages (their re-broadcasts
        # when stuck, or f+1 of a higher round) refill the log, and the upon rules arm
        # this round's timeouts again.
        out.broadcast.extend(m for (_, r), m in self._sent.items() if r == self.round)

    def _transition(self, trigger: Trigger) -> None:
        new = STEP_TRANSITIONS.get((self.step, trigger))
        if new is None:
            raise ConsensusError(f"illegal transition: {trigger.value} in step {self.step.value}")
        self.step = new
        self._next_rebroadcast = self._now + self.timeouts.rebroadcast

    def _schedule(self, kind: TimeoutKind, round: int) -> None:
        self._timer_seq += 1
        deadline = self._now + self.timeouts.of(kind, round)
        heapq.heappush(self._timers, (deadline, self._timer_seq, kind, round))

    def _start_round(self, round: int, out: _Outbox) -> None:
        """StartRound(round), Algorithm 1 lines 11-21."""
        self.round = round
        self._transition(Trigger.START_ROUND)
        self._timers = [t for t in self._timers if t[3] >= round]
        heapq.heapify(self._timers)
        self._awaiting_value = False
        if self.proposer(round) == self.node_id:
            self._propose(out)
        else:
            self._schedule(TimeoutKind.PROPOSE, round)

    def _propose(self, out: _Outbox) -> None:
        previous = self._sent.get((Proposal.TYPE, self.round))
        if previous is not None:  # restored: never sign a second proposal for a round
            out.broadcast.append(previous)
            return
        if self.valid_block is not None:
            proposal = Proposal.create(
                self.signer,
                self.origin,
                height=self.height,
                round=self.round,
                block=self.valid_block,
                valid_round=self.valid_round,
            )
            self._send(proposal, out)
            # Relay the prevotes that justify re-proposing it (its proof of lock).
            pol = self._rounds.get(self.valid_round)
            if pol is not None:
                out.broadcast.extend(
                    v for v in pol.prevotes.values() if v.block_hash == proposal.block_hash
                )
            self._awaiting_value = False
            return
        block: Block | None
        try:
            block = self.get_value(self._now)
        except Exception as exc:  # an injected callable must not break the machine
            out.ignored.append((None, f"get_value failed: {exc!r:.200}"))
            block = None
        if block is not None and (not isinstance(block, Block) or block.height != self.height):
            out.ignored.append((None, "get_value returned a block for another height"))
            block = None
        if block is None:
            # Nothing to propose: let the others time out, and ask again now and then.
            if not self._awaiting_value:
                self._awaiting_value = True
                self._schedule(TimeoutKind.PROPOSE, self.round)
            self._next_poll = self._now + self.timeouts.poll
            return
        self._awaiting_value = False
        self._send(
            Proposal.create(
                self.signer, self.origin, height=self.height, round=self.round, block=block
            ),
            out,
        )

    def _on_timeout(self, trigger: Trigger, out: _Outbox) -> None:
        if trigger is Trigger.SEND_PREVOTE:  # OnTimeoutPropose
            self._prevote(None, out)
        elif trigger is Trigger.SEND_PRECOMMIT:  # OnTimeoutPrevote
            self._precommit(None, out)
        else:  # OnTimeoutPrecommit
            self._start_round(self.round + 1, out)

    def _send(self, message: Message, out: _Outbox) -> Message:
        """Broadcast a message we signed, at most one per (type, round), and log it."""
        key = (message.TYPE, message.round)
        previous = self._sent.get(key)
        if previous is not None:
            out.broadcast.append(previous)
            return previous
        self._sent[key] = message
        self._record(message, verified_note=True, out=out)
        out.broadcast.append(message)
        return message

    def _prevote(self, block_hash: str | None, out: _Outbox) -> None:
        previous = self._sent.get((Prevote.TYPE, self.round))
        if previous is not None:  # restored: never sign a second prevote for a round
            out.broadcast.append(previous)
        else:
            vote = Prevote(self.height, self.round, block_hash, self.node_id)
            self._send(vote.signed(self.signer, self.origin), out)
        self._transition(Trigger.SEND_PREVOTE)

    def _precommit(self, block: Block | None, out: _Outbox) -> None:
        previous = self._sent.get((Precommit.TYPE, self.round))
        if previous is not None:
            out.broadcast.append(previous)
        else:
            self._send(
                Precommit.create(
                    self.signer, self.origin, height=self.height, round=self.round, block=block
                ),
                out,
            )
        self._transition(Trigger.SEND_PRECOMMIT)

    # -- internals: admitting messages ---------------------------------------------

    def _admit(self, message: Message, out: _Outbox) -> str | None:
        """Check and log one message; return why it is ignored, or ``None``."""
        if not isinstance(message, (Proposal, Prevote, Precommit)):
            return "not a consensus message"
        if message.height != self.height:
            return f"wrong height {message.height}: this machine decides {self.height}"
        if self.step is Step.DECIDED:
            return "this height is already decided"
        sender = message.sender
        key = self._keys.get(sender)
        if key is None:
            return f"sender {sender[:16]}… is not a validator at height {self.height}"
        if message.signature in self._seen:
            return "duplicate"
        log = self._rounds.get(message.round)
        previous: Message | None = None
        if isinstance(message, Proposal):
            if sender != self.proposer(message.round):
                return f"{sender[:16]}… is not the proposer of round {message.round}"
            if len(message.block.records) > self.max_block_records:
                return (
                    f"oversized proposal: {len(message.block.records)} records"
                    f" (limit {self.max_block_records})"
                )
            if log is not None:
                previous = log.proposals.get(message.block_hash)
                if (
                    previous is None
                    and len(log.proposals) >= MAX_PROPOSALS_PER_ROUND
                    and not self._voted_for(message.block_hash)
                ):
                    return f"too many proposals in round {message.round} (equivocating proposer)"
        elif log is not None:
            others = log.votes_of(sender, message.TYPE)
            block_hash = message.block_hash
            if any(getattr(m, "block_hash", None) == block_hash for m in others):
                return f"duplicate {message.TYPE} (same voter and value, another signature)"
            if others:
                previous = others[0]
                if block_hash is not None and block_hash not in self._blocks:
                    # Keep a second vote only for a block we hold (bounded); it may
                    # come again once the block is known. Not marked as seen.
                    return (
                        f"conflicting {message.TYPE} in round {message.round} for an unknown"
                        " block (equivocation)"
                    )
        if not self.signature_cache.verify(
            key, message.signature_bytes, message.signing_bytes(self.origin)
        ):
            return "bad signature"
        if previous is not None:
            # Equivocation: remember the evidence. A second proposal of the same block
            # (another valid_round) is dropped; a vote for another value counts too.
            self.evidence.append((previous, message))
            if isinstance(message, Proposal):
                self._seen.add(message.signature_bytes)
                return f"second proposal for one block in round {message.round} (equivocation)"
        if message.round > self.round and not self._future_room(sender, message.round):
            return f"too many future rounds from {sender[:16]}…"
        verified_note = False
        if isinstance(message, Proposal):
            block = message.block
            try:
                size_root = self.ledger_view.root_after(block.records)
            except (PyrsiaError, ValueError) as exc:
                return f"proposal records cannot be appended: {exc}"
            if size_root != (block.tree_size, block.root):
                return "proposal's tree_size or root does not match its records"
        elif isinstance(message, Precommit) and message.checkpoint_signature is not None:
            sig = message.checkpoint_signature
            if (sig.name, sig.key_hash) != self._note_key(sender):
                return "checkpoint signature is not under the voter's note key"
            block_hash = message.block_hash
            assert block_hash is not None
            known = self._blocks.get(block_hash)
            if known is not None:
                if not self._note_ok(known, sender, sig):
                    self._seen.add(message.signature_bytes)  # authentic, so a repeat is junk
                    return "checkpoint signature does not verify for the block"
                verified_note = True
        if isinstance(message, Proposal) and log is not None and log.proposals:
            # A second block in one round: keep it (the others may vote for it), but
            # remember the proposer equivocated.
            self.evidence.append((next(iter(log.proposals.values())), message))
        self._record(message, verified_note=verified_note, out=out)
        return None

    def _note_key(self, voter: str) -> tuple[str, bytes]:
        """The (name, key hash) of a validator's checkpoint-signing key."""
        cached = self._note_keys.get(voter)
        if cached is None:
            name = f"{self.origin}/{voter}"
            cached = self._note_keys[voter] = (name, key_hash(name, self._keys[voter]))
        return cached

    def _note_ok(self, block: Block, voter: str, sig: NoteSignature) -> bool:
        text = block_checkpoint(self.origin, block).to_text()
        return self.signature_cache.verify(self._keys[voter], sig.signature, text.encode())

    def _voted_for(self, block_hash: str) -> bool:
        return any(
            log.prevote_tally.get(block_hash, 0) > 0
            or block_hash in log.certs
            or any(h == block_hash for _, h in log.unverified)
            for log in self._rounds.values()
        )

    def _future_room(self, sender: str, round: int) -> bool:
        """Keep at most a few future rounds per sender, preferring the highest."""
        rounds = sorted(
            r for r, log in self._rounds.items() if r > self.round and log.has_sender(sender)
        )
        if round in rounds or len(rounds) < MAX_FUTURE_ROUNDS_PER_SENDER:
            return True
        if round < rounds[0]:
            return False
        for dropped in self._rounds[rounds[0]].drop_sender(sender):
            self._seen.discard(dropped.signature_bytes)
        return True

    def _record(self, message: Message, *, verified_note: bool, out: _Outbox | None = None) -> None:
        log = self._rounds.get(message.round)
        if log is None:
            log = self._rounds[message.round] = _RoundLog()
        self._seen.add(message.signature_bytes)
        if isinstance(message, Proposal):
            log.proposals.setdefault(message.block_hash, message)
            if message.block_hash not in self._blocks:
                self._learn_block(message.block, out)
        elif isinstance(message, Prevote):
            log.add_prevote(message)
        elif isinstance(message, Precommit):
            log.add_precommit(message, verified_note=verified_note)

    def _learn_block(self, block: Block, out: _Outbox | None) -> None:
        """A block became known: check the note signatures of precommits waiting for it."""
        block_hash = block.hash
        self._blocks[block_hash] = block
        for log in self._rounds.values():
            for (voter, h), p in list(log.unverified.items()):
                if h != block_hash:
                    continue
                del log.unverified[(voter, h)]
                sig = p.checkpoint_signature
                assert sig is not None
                if self._note_ok(block, voter, sig):
                    log.certs.setdefault(block_hash, {})[voter] = sig
                elif out is not None:
                    out.ignored.append(
                        (p, "checkpoint signature does not verify: not counted for a commit")
                    )

    # -- internals: validity ---------------------------------------------------------

    def _valid(self, block: Block, *, build: bool = True) -> bool | None:
        """valid(v): the ledger's rules and (with ``build``) the build check."""
        block_hash = block.hash
        ok = self._ledger_ok.get(block_hash)
        if ok is None:
            try:
                self.ledger_view.check_proposal(block, now=self._now)
                ok = True
            except (PyrsiaError, ValueError):
                ok = False
            self._ledger_ok[block_hash] = ok
        if not ok or not build:
            return ok
        built = self._build_ok.get(block_hash)
        if built is None:
            try:
                answer = self.build_check(block)
            except Exception:  # an injected check that fails is a "no"
                answer = False
            if answer is None:
                self._build_pending = True
                if self._next_poll is None:
                    self._next_poll = self._now + self.timeouts.poll
                return None
            built = self._build_ok[block_hash] = bool(answer)
        return built

    def _gossip(self) -> list[Message]:
        """What we re-broadcast when stuck: our own messages, the current and previous
        rounds' messages, and the proposal and prevotes behind our valid value."""
        out: dict[bytes, Message] = {}
        for m in self._sent.values():
            out.setdefault(m.signature_bytes, m)
        for r, log in self._rounds.items():
            if r >= self.round - 1:
                for m in log.messages():
                    out.setdefault(m.signature_bytes, m)
        if self.valid_block is not None:
            pol = self._rounds.get(self.valid_round)
            valid_hash = self.valid_block.hash
            if pol is not None:
                for m in pol.messages():
                    if isinstance(m, Proposal) and m.block_hash == valid_hash:
                        out.setdefault(m.signature_bytes, m)
                    elif isinstance(m, Prevote) and m.block_hash == valid_hash:
                        out.setdefault(m.signature_bytes, m)
        return list(out.values())

    # -- internals: the upon rules ---------------------------------------------------

    def _settle(self, out: _Outbox) -> None:
        """Apply the upon rules until none fires (each firing moves state forward)."""
        self._build_pending = False
        for _ in range(10_000):
            if self.step not in _ACTIVE:
                return
            for rule in UPON_RULES:
                if self.step in rule.steps and rule.fire(self, out):
                    break
            else:
                return
        raise ConsensusError("the upon rules did not settle")  # pragma: no cover

    def _proposals(self, round: int) -> list[Proposal]:
        log = self._rounds.get(round)
        return list(log.proposals.values()) if log is not None else []

    def _decide(self, block: Block, sigs: Mapping[str, NoteSignature], out: _Outbox) -> None:
        certificate = SignedNote(
            block_checkpoint(self.origin, block).to_text(),
            tuple(sigs[v] for v in sorted(sigs)),
        )
        self.decision = CommittedBlock(block, certificate)
        self._transition(Trigger.DECIDE)
        self._timers.clear()
        self._next_rebroadcast = None
        self._next_poll = None
        out.committed = self.decision


def _rule_decide(m: TendermintMachine, out: _Outbox) -> bool:
    """Line 49: a proposal of v in some round r and 2f+1 precommits for id(v) in r."""
    for log in m._rounds.values():
        for block_hash, sigs in log.certs.items():
            if len(sigs) >= m._quorum:
                block = m._blocks.get(block_hash)
                if block is not None and m._valid(block, build=False):
                    m._decide(block, sigs, out)
                    return True
    return False


def _rule_skip(m: TendermintMachine, out: _Outbox) -> bool:
    """Line 55: f+1 messages of a higher round: StartRound(that round)."""
    target = -1
    for r, log in m._rounds.items():
        if r > m.round and r > target and len(log.senders()) >= m._skip:
            target = r
    if target < 0:
        return False
    m._start_round(target, out)
    return True


def _lock_allows(m: TendermintMachine, block_hash: str, pol_round: int | None) -> bool:
    locked = m.locked_block
    if m.locked_round == -1 or (locked is not None and locked.hash == block_hash):
        return True
    return pol_round is not None and m.locked_round <= pol_round


def _rule_prevote_fresh(m: TendermintMachine, out: _Outbox) -> bool:
    """Line 22: PROPOSAL(h, round_p, v, -1) while step = propose."""
    for p in m._proposals(m.round):
        if p.valid_round != -1:
            continue
        if not _lock_allows(m, p.block_hash, None):
            m._prevote(None, out)
            return True
        valid = m._valid(p.block)
        if valid is None:
            continue  # the build check is not done: wait (or time out)
        m._prevote(p.block_hash if valid else None, out)
        return True
    return False


def _rule_prevote_pol(m: TendermintMachine, out: _Outbox) -> bool:
    """Line 28: PROPOSAL(h, round_p, v, vr) and 2f+1 PREVOTE(h, vr, id(v)), 0 <= vr < round_p."""
    for p in m._proposals(m.round):
        vr = p.valid_round
        if not 0 <= vr < m.round:
            continue
        pol = m._rounds.get(vr)
        if pol is None or pol.prevote_tally.get(p.block_hash, 0) < m._quorum:
            continue
        if not _lock_allows(m, p.block_hash, vr):
            m._prevote(None, out)
            return True
        valid = m._valid(p.block)
        if valid is None:
            continue
        m._prevote(p.block_hash if valid else None, out)
        return True
    return False


def _rule_prevote_timer(m: TendermintMachine, out: _Outbox) -> bool:
    """Line 34: 2f+1 PREVOTE(h, round_p, *) for the first time: schedule OnTimeoutPrevote."""
    key = (34, m.round)
    log = m._rounds.get(m.round)
    if key in m._fired or log is None or len(log.prevoters) < m._quorum:
        return False
    m._fired.add(key)
    m._schedule(TimeoutKind.PREVOTE, m.round)
    return True


def _rule_lock(m: TendermintMachine, out: _Outbox) -> bool:
    """Line 36: PROPOSAL(h, round_p, v) and 2f+1 PREVOTE(h, round_p, id(v)), valid(v),
    for the first time: lock and precommit v (if in prevote); v becomes the valid value."""
    key = (36, m.round)
    log = m._rounds.get(m.round)
    if key in m._fired or log is None:
        return False
    for p in log.proposals.values():
        if log.prevote_tally.get(p.block_hash, 0) < m._quorum:
            continue
        if m._valid(p.block) is not True:
            continue
        m._fired.add(key)
        if m.step is Step.PREVOTE:
            m.locked_round, m.locked_block = m.round, p.block
            m._precommit(p.block, out)
        m.valid_round, m.valid_block = m.round, p.block
        # Gossip (the paper's assumption): relay the proof of lock at once, so a vote a
        # Byzantine validator showed only to some reaches every correct validator while
        # it is still in this round, and they all hold the same valid value.
        out.broadcast.extend(
            v for (voter, h), v in log.prevotes.items() if h == p.block_hash and voter != m._me
        )
        return True
    return False


def _rule_precommit_nil(m: TendermintMachine, out: _Outbox) -> bool:
    """Line 44: 2f+1 PREVOTE(h, round_p, nil) while step = prevote: precommit nil."""
    log = m._rounds.get(m.round)
    if log is None or log.prevote_tally.get(None, 0) < m._quorum:
        return False
    m._precommit(None, out)
    return True


def _rule_precommit_timer(m: TendermintMachine, out: _Outbox) -> bool:
    """Line 47: 2f+1 PRECOMMIT(h, round_p, *) for the first time: schedule OnTimeoutPrecommit."""
    key = (47, m.round)
    log = m._rounds.get(m.round)
    if key in m._fired or log is None or len(log.precommitters) < m._quorum:
        return False
    m._fired.add(key)
    m._schedule(TimeoutKind.PRECOMMIT, m.round)
    return True


_ANY: Final = _ACTIVE
_PROPOSE: Final = frozenset({Step.PROPOSE})
_PREVOTE: Final = frozenset({Step.PREVOTE})

#: Algorithm 1's upon clauses, tried in this order after every input until none fires.
UPON_RULES: Final[tuple[UponRule, ...]] = (
    UponRule(
        49, "proposal v of round r + 2f+1 precommits id(v) in r: decide v", _ANY, _rule_decide
    ),
    UponRule(55, "f+1 messages of round r > round_p: start round r", _ANY, _rule_skip),
    UponRule(
        22,
        "proposal (v, -1): prevote v if valid and lock allows, else nil",
        _PROPOSE,
        _rule_prevote_fresh,
    ),
    UponRule(
        28,
        "proposal (v, vr) + 2f+1 prevotes id(v) in vr: prevote v if valid and"
        " locked_round <= vr or locked on v, else nil",
        _PROPOSE,
        _rule_prevote_pol,
    ),
    UponRule(
        36,
        "proposal v + 2f+1 prevotes id(v), valid(v), first time: lock and precommit"
        " v (in prevote); valid value := v",
        frozenset({Step.PREVOTE, Step.PRECOMMIT}),
        _rule_lock,
    ),
    UponRule(44, "2f+1 prevotes nil: precommit nil", _PREVOTE, _rule_precommit_nil),
    UponRule(
        34, "2f+1 prevotes, first time: schedule timeout prevote", _PREVOTE, _rule_prevote_timer
    ),
    UponRule(
        47, "2f+1 precommits, first time: schedule timeout precommit", _ANY, _rule_precommit_timer
    ),
)
