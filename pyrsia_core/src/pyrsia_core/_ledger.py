"""The ledger: blocks of log records, committed by a quorum of build nodes (DESIGN §4).

A block's header commits to its records through the Merkle root of the whole
log after the block (``tree_size``, ``root``). A block is committed when its
*certificate* -- a C2SP checkpoint of ``(origin, tree_size, root)`` with the
extension line ``block <height> <block hash>`` -- is signed by more than 2/3
of the validator set in force at that height. Everything here is pure: the
caller feeds blocks in, and the ledger raises :class:`BlockError` naming the
rule a bad block breaks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from ._canonical import canonical_json, canonical_loads
from ._checkpoint import (
    Checkpoint,
    NoteVerifier,
    SignedNote,
    sign_checkpoint,
    verify_note,
)
from ._identity import PublicKey, Signer
from ._merkle import MerkleTree, leaf_hash, node_hash
from ._records import NODE_PACKAGE_TYPE, Operation, Record, SignedRecord, verify_records
from .errors import (
    BlockError,
    CheckpointError,
    EncodingError,
    NoteError,
    RecordError,
    SignatureError,
    VerificationError,
)

__all__ = [
    "MAX_BLOCK_RECORDS",
    "Block",
    "CommittedBlock",
    "CompactRange",
    "Ledger",
    "ValidatorSet",
    "block_checkpoint",
    "make_genesis",
    "quorum_threshold",
]

ZERO_HASH: Final = "0" * 64
MAX_BLOCK_RECORDS: Final = 100_000
MAX_CLOCK_SKEW: Final = 600
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_ORIGIN: Final = re.compile(r"[A-Za-z0-9._/-]{1,128}")


def quorum_threshold(n: int) -> int:
    """Smallest number of signatures that is more than 2/3 of ``n``."""
    if n < 1:
        raise ValueError("a validator set has at least one member")
    return (2 * n) // 3 + 1


def _sorted_members(members: Mapping[str, PublicKey]) -> dict[str, PublicKey]:
    return dict(sorted(members.items()))


def _record_tuple(records: Iterable[SignedRecord]) -> tuple[SignedRecord, ...]:
    return tuple(records)


@attrs.frozen
class ValidatorSet:
    """The authorized build nodes, by node id."""

    members: Mapping[str, PublicKey] = attrs.field(converter=_sorted_members)

    @classmethod
    def of(cls, keys: Iterable[PublicKey]) -> ValidatorSet:
        return cls({k.node_id: k for k in keys})

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.members

    @property
    def threshold(self) -> int:
        return quorum_threshold(len(self.members))

    def ordered(self) -> list[str]:
        return list(self.members)

    def verifiers(self, origin: str) -> list[NoteVerifier]:
        return [NoteVerifier(f"{origin}/{nid}", key) for nid, key in self.members.items()]

    def apply(self, records: Iterable[Record]) -> ValidatorSet:
        """The set after AddNode/RemoveNode records (which take effect at the next height)."""
        members = dict(self.members)
        for r in records:
            if r.operation == Operation.ADD_NODE:
                members[r.package_specific_id] = PublicKey.from_hex(r.package_specific_artifact_id)
            elif r.operation == Operation.REMOVE_NODE:
                members.pop(r.package_specific_id, None)
        return ValidatorSet(members)

    def to_json(self) -> dict[str, str]:
        return {nid: key.hex for nid, key in self.members.items()}


@attrs.frozen
class Block:
    """``{height, parent, timestamp, proposer, records[], tree_size, root}``.

    The genesis block (height 0) also names the network's ``origin``.
    """

    height: int
    parent: str
    timestamp: int
    proposer: str
    records: tuple[SignedRecord, ...] = attrs.field(converter=_record_tuple, repr=False)
    tree_size: int
    root: str
    origin: str = ""

    def header(self) -> dict[str, Any]:
        h: dict[str, Any] = {
            "height": self.height,
            "parent": self.parent,
            "timestamp": self.timestamp,
            "proposer": self.proposer,
            "num_records": len(self.records),
            "tree_size": self.tree_size,
            "root": self.root,
        }
        if self.height == 0:
            h["origin"] = self.origin
        return h

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical header (hex)."""
        return hashlib.sha256(canonical_json(self.header())).hexdigest()

    def to_json(self) -> dict[str, Any]:
        out = self.header()
        out["records"] = [r.to_json() for r in self.records]
        return out

    @classmethod
    def from_json(cls, data: Any) -> Block:
        """Parse a block; shape errors raise :class:`BlockError` with rule ``format``."""
        if not isinstance(data, Mapping):
            raise BlockError("format", "a block is a JSON object")
        keys = {
            "height",
            "parent",
            "timestamp",
            "proposer",
            "num_records",
            "tree_size",
            "root",
            "records",
        }
        height = data.get("height")
        if height == 0:
            keys.add("origin")
        if set(data) != keys:
            missing = sorted(keys - set(data))
            extra = sorted(set(data) - keys)
            raise BlockError("format", f"block fields wrong: missing {missing}, unknown {extra}")
        for name in ("height", "timestamp", "num_records", "tree_size"):
            if type(data[name]) is not int or data[name] < 0:
                raise BlockError("format", f"block field {name!r} must be a non-negative integer")
        for name in ("parent", "proposer", "root"):
            if not isinstance(data[name], str) or not _HEX64.fullmatch(data[name]):
                raise BlockError("format", f"block field {name!r} must be 64 lowercase hex")
        if height == 0 and (
            not isinstance(data["origin"], str) or not _ORIGIN.fullmatch(data["origin"])
        ):
            raise BlockError("format", "genesis origin is malformed")
        if not isinstance(data["records"], list):
            raise BlockError("format", "block records must be a list")
        if len(data["records"]) != data["num_records"]:
            raise BlockError("format", "num_records does not match the records")
        if len(data["records"]) > MAX_BLOCK_RECORDS:
            raise BlockError("format", f"block has more than {MAX_BLOCK_RECORDS} records")
        try:
            records = tuple(SignedRecord.from_json(r) for r in data["records"])
        except RecordError as exc:
            raise BlockError("record", str(exc)) from None
        return cls(
            height=data["height"],
            parent=data["parent"],
            timestamp=data["timestamp"],
            proposer=data["proposer"],
            records=records,
            tree_size=data["tree_size"],
            root=data["root"],
            origin=data.get("origin", ""),
        )

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes) -> Block:
        try:
            return cls.from_json(canonical_loads(data))
        except EncodingError as exc:
            raise BlockError("format", f"block is not valid JSON: {exc}") from None


def block_checkpoint(origin: str, block: Block) -> Checkpoint:
    """The checkpoint a quorum signs to commit ``block``."""
    return Checkpoint(
        origin=origin,
        size=block.tree_size,
        root=bytes.fromhex(block.root),
        extensions=(f"block {block.height} {block.hash}",),
    )


@attrs.frozen
class CommittedBlock:
    """A block and its certificate (the signed checkpoint note)."""

    block: Block
    certificate: SignedNote

    def to_json(self) -> dict[str, Any]:
        return {"block": self.block.to_json(), "certificate": self.certificate.to_text()}

    @classmethod
    def from_json(cls, data: Any) -> CommittedBlock:
        if not isinstance(data, Mapping) or set(data) != {"block", "certificate"}:
            raise BlockError("format", "a committed block has 'block' and 'certificate'")
        if not isinstance(data["certificate"], str):
            raise BlockError("format", "certificate must be the signed note text")
        try:
            note = SignedNote.parse(data["certificate"])
        except NoteError as exc:
            raise BlockError("quorum", f"certificate is malformed: {exc}") from None
        return cls(Block.from_json(data["block"]), note)

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes) -> CommittedBlock:
        try:
            return cls.from_json(canonical_loads(data))
        except EncodingError as exc:
            raise BlockError("format", f"committed block is not valid JSON: {exc}") from None


def make_genesis(
    *,
    origin: str,
    validators: Sequence[Signer],
    timestamp: int,
) -> CommittedBlock:
    """A genesis block naming the network and its first validators, signed by all of them."""
    if not validators:
        raise ValueError("genesis needs at least one validator")
    if not _ORIGIN.fullmatch(origin):
        raise ValueError(f"origin {origin!r} must match {_ORIGIN.pattern}")
    records = tuple(
        SignedRecord.sign(
            Record.node_change(signer=s, subject=s.public_key, timestamp=timestamp), s
        )
        for s in validators
    )
    tree = MerkleTree.from_leaves(leaf_hash(r.record.canonical()) for r in records)
    block = Block(
        height=0,
        parent=ZERO_HASH,
        timestamp=timestamp,
        proposer=validators[0].node_id,
        records=records,
        tree_size=tree.size,
        root=tree.root().hex(),
        origin=origin,
    )
    note = sign_checkpoint(
        block_checkpoint(origin, block), [(f"{origin}/{s.node_id}", s) for s in validators]
    )
    return CommittedBlock(block, note)


@attrs.define(eq=False)
class CompactRange:
    """The right frontier of a Merkle log: perfect-subtree roots covering ``[0, size)``.

    Enough to compute the root after appending leaves without touching the rest
    of the tree (O(log n) hashes), which is how a candidate block is checked.
    """

    size: int = 0
    nodes: list[tuple[int, bytes]] = attrs.Factory(list)  # (level, hash), highest level first

    @classmethod
    def of(cls, tree: MerkleTree) -> CompactRange:
        size = tree.size
        nodes: list[tuple[int, bytes]] = []
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                index = (size >> level) - 1
                data = tree.levels[level]
                nodes.append((level, bytes(data[index * 32 : index * 32 + 32])))
        return cls(size, nodes)

    def append(self, leaf: bytes) -> None:
        self.nodes.append((0, leaf))
        self.size += 1
        while len(self.nodes) >= 2 and self.nodes[-1][0] == self.nodes[-2][0]:
            level, right = self.nodes.pop()
            _, left = self.nodes.pop()
            self.nodes.append((level + 1, node_hash(left, right)))

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        if not self.nodes:
            return hashlib.sha256(b"").digest()
        h = self.nodes[-1][1]
        for _, left in reversed(self.nodes[:-1]):
            h = node_hash(left, h)
        return h


@attrs.define(eq=False)
class Ledger:
    """The chain state a node trusts: head, validator set and the Merkle log of all records.

    ``Ledger.start(genesis)`` trusts a genesis block (it comes from configuration
    or from the operator); every later block goes through :meth:`validate`.
    """

    origin: str
    genesis_hash: str
    head: Block
    validators: ValidatorSet
    tree: MerkleTree
    max_skew: int = MAX_CLOCK_SKEW
    #: Checks the records' signatures (raises ``SignatureError``); injectable so a node
    #: can verify large blocks on several cores. The checks are the same.
    record_verifier: Callable[[Sequence[SignedRecord]], None] = verify_records

    @classmethod
    def start(cls, genesis: CommittedBlock) -> Ledger:
        block = genesis.block
        if block.height != 0 or block.parent != ZERO_HASH:
            raise BlockError("genesis", "genesis has height 0 and a zero parent")
        if not block.records:
            raise BlockError("genesis", "genesis names at least one validator")
        for sr in block.records:
            if sr.record.operation != Operation.ADD_NODE:
                raise BlockError("genesis", "genesis holds only AddNode records")
            if sr.record.package_specific_id != sr.record.node_id:
                raise BlockError("genesis", "genesis validators add themselves")
        validators = ValidatorSet({}).apply(r.record for r in block.records)
        ledger = cls(
            origin=block.origin,
            genesis_hash=block.hash,
            head=block,
            validators=validators,
            tree=MerkleTree(),
        )
        # Check the genesis as any block, against an empty chain.
        ledger._check_records(block, validators)
        tree = MerkleTree.from_leaves(leaf_hash(r.record.canonical()) for r in block.records)
        if block.tree_size != tree.size or block.root != tree.root().hex():
            raise BlockError("root", "genesis root does not match its records")
        ledger._check_certificate(block, genesis.certificate, validators)
        ledger.tree = tree
        return ledger

    @classmethod
    def restore(
        cls, *, genesis: Block, head: Block, validators: ValidatorSet, tree: MerkleTree
    ) -> Ledger:
        """Rebuild trusted state from a store that only ever held validated blocks."""
        if tree.size != head.tree_size or tree.root().hex() != head.root:
            raise BlockError("root", "stored Merkle tree does not match the stored head")
        return cls(
            origin=genesis.origin,
            genesis_hash=genesis.hash,
            head=head,
            validators=validators,
            tree=tree,
        )

    @property
    def height(self) -> int:
        return self.head.height

    @property
    def head_hash(self) -> str:
        return self.head.hash

    # -- validation ----------------------------------------------------------------

    def _check_records(self, block: Block, validators: ValidatorSet) -> None:
        try:
            self.record_verifier(block.records)
        except SignatureError as exc:
            raise BlockError("record-signature", str(exc)) from None
        pending = ValidatorSet(validators.members)
        for i, sr in enumerate(block.records):
            r = sr.record
            if block.height > 0 and r.node_id not in validators:
                raise BlockError(
                    "record-author",
                    f"record {i} ({r.id}) is by {r.node_id[:16]}…, not a build node",
                )
            if r.operation in (Operation.ADD_NODE, Operation.REMOVE_NODE):
                if r.package_type != NODE_PACKAGE_TYPE:
                    raise BlockError("record", f"record {i}: node change with wrong package_type")
                if r.operation == Operation.REMOVE_NODE:
                    if r.package_specific_id not in pending:
                        raise BlockError("validator-set", f"record {i} removes a non-member")
                    if len(pending) == 1:
                        raise BlockError("validator-set", "the last build node cannot be removed")
                pending = pending.apply([r])

    def _check_certificate(
        self, block: Block, certificate: SignedNote, validators: ValidatorSet
    ) -> frozenset[str]:
        expected = block_checkpoint(self.origin, block).to_text()
        if certificate.text != expected:
            raise BlockError(
                "quorum",
                "certificate does not sign this block's checkpoint (origin, size, root, hash)",
            )
        try:
            return verify_note(certificate, validators.verifiers(self.origin), validators.threshold)
        except (NoteError, CheckpointError, SignatureError) as exc:
            raise BlockError("quorum", str(exc)) from None

    def check_certificate(self, committed: CommittedBlock) -> frozenset[str]:
        """Check only that a quorum of the *current* build nodes signed ``committed``'s
        checkpoint (cheap: no records are checked); returns the signers' names.

        For a block further ahead than the next one, whose parents are not here yet:
        a block from after a change of the build nodes may fail this although valid.
        Raises :class:`BlockError`.
        """
        return self._check_certificate(committed.block, committed.certificate, self.validators)

    def validate(self, committed: CommittedBlock, *, now: float | None = None) -> list[bytes]:
        """Check ``committed`` as the next block; return its leaf hashes (not yet adopted).

        Raises :class:`BlockError` naming the first rule broken.
        """
        block = committed.block
        self.check_proposal(block, now=now)
        leaves = self._leaves_checked(block)
        self._check_certificate(block, committed.certificate, self.validators)
        return leaves

    def check_proposal(self, block: Block, *, now: float | None = None) -> None:
        """Every rule but the certificate (what a validator checks before voting)."""
        if block.height != self.head.height + 1:
            raise BlockError(
                "height", f"expected height {self.head.height + 1}, got {block.height}"
            )
        if block.parent != self.head.hash:
            raise BlockError(
                "parent", f"parent {block.parent[:16]}… is not the head {self.head.hash[:16]}…"
            )
        if block.timestamp < self.head.timestamp:
            raise BlockError("timestamp", "block is older than its parent")
        if now is not None and block.timestamp > now + self.max_skew:
            raise BlockError("timestamp", "block timestamp is in the future")
        if block.proposer not in self.validators:
            raise BlockError("proposer", f"proposer {block.proposer[:16]}… is not a build node")
        if not block.records:
            raise BlockError("records", "a block holds at least one record")
        if len(block.records) > MAX_BLOCK_RECORDS:
            raise BlockError("records", "too many records")
        if block.tree_size != self.tree.size + len(block.records):
            raise BlockError(
                "tree_size",
                f"tree_size {block.tree_size} != {self.tree.size} + {len(block.records)} records",
            )
        self._check_records(block, self.validators)

    def _leaves_checked(self, block: Block) -> list[bytes]:
        leaves = [leaf_hash(r.record.canonical()) for r in block.records]
        frontier = CompactRange.of(self.tree)
        frontier.extend(leaves)
        if frontier.root().hex() != block.root:
            raise BlockError("root", "Merkle root does not match the block's records")
        return leaves

    def root_after(self, records: Sequence[SignedRecord]) -> tuple[int, str]:
        """(tree_size, root) the log would have after appending ``records``."""
        frontier = CompactRange.of(self.tree)
        frontier.extend(leaf_hash(r.record.canonical()) for r in records)
        return frontier.size, frontier.root().hex()

    def append(self, committed: CommittedBlock, *, now: float | None = None) -> list[bytes]:
        """Validate and adopt the next block; return its leaf hashes."""
        leaves = self.validate(committed, now=now)
        self.adopt(committed.block, leaves)
        return leaves

    def adopt(self, block: Block, leaves: Sequence[bytes]) -> None:
        """Adopt a block already validated (used by :meth:`append` and by stores on reload)."""
        self.tree.extend(leaves)
        self.head = block
        self.validators = self.validators.apply(r.record for r in block.records)

    def propose(
        self, *, proposer: Signer, records: Sequence[SignedRecord], timestamp: int
    ) -> Block:
        """Build the next block from ``records``."""
        size, root = self.root_after(records)
        return Block(
            height=self.head.height + 1,
            parent=self.head.hash,
            timestamp=max(timestamp, self.head.timestamp),
            proposer=proposer.node_id,
            records=tuple(records),
            tree_size=size,
            root=root,
        )

    def sign_block(self, block: Block, signer: Signer) -> SignedNote:
        """This node's vote: the block's checkpoint signed with its key."""
        return sign_checkpoint(
            block_checkpoint(self.origin, block), [(f"{self.origin}/{signer.node_id}", signer)]
        )


# Re-exported for callers that catch everything a block can raise.
BlockRejected = (BlockError, VerificationError)
