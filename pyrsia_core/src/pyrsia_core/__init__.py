"""pyrsia_core: the pure logic of pyrsia (no I/O).

Content addressing, node identity, canonical encoding, transparency-log
records, the RFC 9162 Merkle log, C2SP checkpoints, the ledger and its
persistence over the :class:`~pyrsia_core.interfaces.KeyValueStore` interface,
and the plugin interfaces. Everything public is re-exported here.
"""

from __future__ import annotations

from . import errors, interfaces
from ._canonical import canonical_json, canonical_loads
from ._checkpoint import (
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
from ._digest import Digest, DigestVerifier
from ._identity import Ed25519Signer, Ed25519Verifier, PublicKey, Signer, Verifier, node_id_of
from ._ledger import (
    Block,
    CommittedBlock,
    CompactRange,
    Ledger,
    ValidatorSet,
    block_checkpoint,
    make_genesis,
    quorum_threshold,
)
from ._logstore import LogStore, StoredRecord
from ._merkle import (
    MerkleTree,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)
from ._parts import PARTS_RECORD_TYPE, PartHasher, PartList, PartListError
from ._records import NODE_PACKAGE_TYPE, RECORD_FIELDS, Operation, Record, SignedRecord
from ._witness import (
    AddCheckpointRequest,
    Cosigner,
    LogKeys,
    SplitView,
    WitnessOutcome,
    WitnessPolicy,
    WitnessRequestError,
    add_checkpoint,
    add_cosignatures,
    cosign,
    cosignature_key_id,
    cosignature_message,
    find_split_view,
)

__version__ = "0.1.0"

__all__ = [
    "NODE_PACKAGE_TYPE",
    "PARTS_RECORD_TYPE",
    "RECORD_FIELDS",
    "AddCheckpointRequest",
    "Block",
    "Checkpoint",
    "CommittedBlock",
    "CompactRange",
    "Cosigner",
    "Digest",
    "DigestVerifier",
    "Ed25519Signer",
    "Ed25519Verifier",
    "Ledger",
    "LogKeys",
    "LogStore",
    "MerkleTree",
    "NoteSignature",
    "NoteVerifier",
    "Operation",
    "PartHasher",
    "PartList",
    "PartListError",
    "PublicKey",
    "Record",
    "SignedNote",
    "SignedRecord",
    "Signer",
    "SplitView",
    "StoredRecord",
    "ValidatorSet",
    "Verifier",
    "WitnessOutcome",
    "WitnessPolicy",
    "WitnessRequestError",
    "__version__",
    "add_checkpoint",
    "add_cosignatures",
    "block_checkpoint",
    "canonical_json",
    "canonical_loads",
    "cosign",
    "cosignature_key_id",
    "cosignature_message",
    "errors",
    "find_split_view",
    "interfaces",
    "key_hash",
    "leaf_hash",
    "make_genesis",
    "node_hash",
    "node_id_of",
    "open_checkpoint",
    "quorum_threshold",
    "sign_checkpoint",
    "sign_note",
    "verify_consistency",
    "verify_inclusion",
    "verify_note",
]
