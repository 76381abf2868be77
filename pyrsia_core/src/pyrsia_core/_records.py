"""Transparency-log records: the seed's fields, signed by the node that made them."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from ._canonical import canonical_flat_object, canonical_loads
from ._identity import Ed25519Verifier, PublicKey, Signer, node_id_of
from .errors import EncodingError, KeyError_, RecordError, SignatureError

__all__ = [
    "NODE_PACKAGE_TYPE",
    "OPERATIONS",
    "RECORD_FIELDS",
    "Operation",
    "Record",
    "SignedRecord",
    "verify_records",
]


class Operation:
    """The ``operation`` values of log records (the seed's names)."""

    ADD_ARTIFACT: Final = "AddArtifact"
    REMOVE_ARTIFACT: Final = "RemoveArtifact"
    ADD_NODE: Final = "AddNode"
    REMOVE_NODE: Final = "RemoveNode"


OPERATIONS: Final = frozenset(
    {Operation.ADD_ARTIFACT, Operation.REMOVE_ARTIFACT, Operation.ADD_NODE, Operation.REMOVE_NODE}
)
#: ``package_type`` of AddNode/RemoveNode records (the subject is a node, not a package).
NODE_PACKAGE_TYPE: Final = "Node"

#: The seed's fields, in the seed's order, with their JSON types.
RECORD_FIELDS: Final[tuple[tuple[str, type], ...]] = (
    ("id", str),
    ("package_type", str),
    ("package_specific_id", str),
    ("num_artifacts", int),
    ("package_specific_artifact_id", str),
    ("artifact_hash", str),
    ("source_hash", str),
    ("artifact_id", str),
    ("source_id", str),
    ("timestamp", int),
    ("operation", str),
    ("node_id", str),
    ("node_public_key", str),
)
_FIELD_NAMES: Final = frozenset(name for name, _ in RECORD_FIELDS)
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_TEXT: Final = 1024
MAX_RECORD_BYTES: Final = 8192


_CONTROL: Final = re.compile(r"[\x00-\x1f]")


def _text(value: str, name: str) -> None:
    if len(value) > MAX_TEXT:
        raise RecordError(f"record field {name!r} is longer than {MAX_TEXT} characters")
    if _CONTROL.search(value):
        raise RecordError(f"record field {name!r} contains control characters")


def _hex64(value: str, name: str, *, allow_empty: bool = False) -> None:
    if allow_empty and value == "":
        return
    if not _HEX64.fullmatch(value):
        raise RecordError(f"record field {name!r} must be 64 lowercase hex characters")


@attrs.frozen
class Record:
    """One log record with exactly the seed's fields and JSON types."""

    id: str
    package_type: str
    package_specific_id: str
    num_artifacts: int
    package_specific_artifact_id: str
    artifact_hash: str
    source_hash: str
    artifact_id: str
    source_id: str
    timestamp: int
    operation: str
    node_id: str
    node_public_key: str
    _canonical: bytes | None = attrs.field(default=None, init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        for name, typ in RECORD_FIELDS:
            value = getattr(self, name)
            if type(value) is not typ:
                raise RecordError(
                    f"record field {name!r} must be a {typ.__name__}, got {type(value).__name__}"
                )
        for name in ("id", "artifact_id", "source_id"):
            if not _UUID.fullmatch(getattr(self, name)):
                raise RecordError(f"record field {name!r} must be a lowercase UUID")
        for name in ("package_type", "package_specific_id", "package_specific_artifact_id"):
            _text(getattr(self, name), name)
            if not getattr(self, name):
                raise RecordError(f"record field {name!r} must not be empty")
        _hex64(self.artifact_hash, "artifact_hash")
        _hex64(self.source_hash, "source_hash", allow_empty=True)
        _hex64(self.node_id, "node_id")
        _hex64(self.node_public_key, "node_public_key")
        if self.operation not in OPERATIONS:
            raise RecordError(
                f"record operation {self.operation!r} is not one of {', '.join(sorted(OPERATIONS))}"
            )
        if not 1 <= self.num_artifacts <= 100_000:
            raise RecordError("record field 'num_artifacts' must be between 1 and 100000")
        if not 0 <= self.timestamp < 2**40:
            raise RecordError("record field 'timestamp' must be a non-negative Unix time")
        if node_id_of(bytes.fromhex(self.node_public_key)) != self.node_id:
            raise RecordError("record node_id is not the SHA-256 of its node_public_key")
        if self.operation in (Operation.ADD_NODE, Operation.REMOVE_NODE):
            if self.package_type != NODE_PACKAGE_TYPE:
                raise RecordError(
                    f"{self.operation} records have package_type {NODE_PACKAGE_TYPE!r}"
                )
            _hex64(self.package_specific_id, "package_specific_id")
            _hex64(self.package_specific_artifact_id, "package_specific_artifact_id")
            if node_id_of(bytes.fromhex(self.package_specific_artifact_id)) != (
                self.package_specific_id
            ):
                raise RecordError(
                    f"{self.operation}: package_specific_id must be the node id of the key "
                    "in package_specific_artifact_id"
                )

    # -- construction ------------------------------------------------------------

    @classmethod
    def new(
        cls,
        *,
        signer: Signer,
        package_type: str,
        package_specific_id: str,
        package_specific_artifact_id: str,
        artifact_hash: str,
        num_artifacts: int,
        timestamp: int,
        operation: str = Operation.ADD_ARTIFACT,
        source_hash: str = "",
        source_id: str | None = None,
    ) -> Record:
        return cls(
            id=str(uuid.uuid4()),
            package_type=package_type,
            package_specific_id=package_specific_id,
            num_artifacts=num_artifacts,
            package_specific_artifact_id=package_specific_artifact_id,
            artifact_hash=artifact_hash,
            source_hash=source_hash,
            artifact_id=str(uuid.uuid4()),
            source_id=source_id or str(uuid.uuid4()),
            timestamp=timestamp,
            operation=operation,
            node_id=signer.public_key.node_id,
            node_public_key=signer.public_key.hex,
        )

    @classmethod
    def node_change(
        cls, *, signer: Signer, subject: PublicKey, timestamp: int, add: bool = True
    ) -> Record:
        """An AddNode/RemoveNode record: ``subject`` joins or leaves the build nodes."""
        return cls.new(
            signer=signer,
            package_type=NODE_PACKAGE_TYPE,
            package_specific_id=subject.node_id,
            package_specific_artifact_id=subject.hex,
            artifact_hash=subject.node_id,
            num_artifacts=1,
            timestamp=timestamp,
            operation=Operation.ADD_NODE if add else Operation.REMOVE_NODE,
        )

    @classmethod
    def from_json(cls, data: Any) -> Record:
        """Build from a decoded JSON object; missing, extra or mistyped fields raise RecordError."""
        if not isinstance(data, Mapping):
            raise RecordError(f"a record is a JSON object, got {type(data).__name__}")
        missing = [name for name, _ in RECORD_FIELDS if name not in data]
        if missing:
            raise RecordError(f"record is missing field(s): {', '.join(missing)}")
        extra = sorted(set(data) - _FIELD_NAMES)
        if extra:
            raise RecordError(f"record has unknown field(s): {', '.join(map(str, extra))[:200]}")
        return cls(**{name: data[name] for name, _ in RECORD_FIELDS})

    def to_json(self) -> dict[str, Any]:
        """The seed's JSON object, fields in the seed's order."""
        return {name: getattr(self, name) for name, _ in RECORD_FIELDS}

    def canonical(self) -> bytes:
        """The bytes that are signed and hashed into the Merkle log (RFC 8785)."""
        cached = self._canonical
        if cached is None:
            cached = canonical_flat_object(self.to_json())
            object.__setattr__(self, "_canonical", cached)
        return cached

    @property
    def public_key(self) -> PublicKey:
        return PublicKey.from_hex(self.node_public_key)


# Few nodes sign records (the build nodes): keep their parsed keys.
_VERIFIERS: dict[str, Ed25519Verifier] = {}
_MAX_CACHED_VERIFIERS: Final = 1024


class _VerifiedCache:
    """Signatures already checked, by SHA-256 over (key, signature, signed bytes).

    A build node meets each record several times (pending, in a proposal, in the
    committed block); the first check is enough. The key covers every signed byte,
    so only the exact record that verified hits. Bounded: oldest half dropped when full.
    """

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._seen: dict[bytes, None] = {}

    @staticmethod
    def key(sr: SignedRecord) -> bytes:
        h = hashlib.sha256(sr.record.node_public_key.encode())
        h.update(sr.signature)
        h.update(sr.record.canonical())
        return h.digest()

    def __contains__(self, key: bytes) -> bool:
        return key in self._seen

    def add(self, key: bytes) -> None:
        if len(self._seen) >= self.size:
            for old in list(self._seen)[: self.size // 2]:
                del self._seen[old]
        self._seen[key] = None


VERIFIED: Final = _VerifiedCache()


@attrs.frozen
class SignedRecord:
    """A record plus its author's Ed25519 signature over :meth:`Record.canonical`."""

    record: Record
    signature: bytes = attrs.field(repr=False)

    @classmethod
    def sign(cls, record: Record, signer: Signer) -> SignedRecord:
        if record.node_public_key != signer.public_key.hex:
            raise RecordError("a record is signed by the node it names")
        return cls(record, signer.sign(record.canonical()))

    def verify(self) -> None:
        """Raise :class:`SignatureError` unless the signature is the named node's.

        A record that verified before (the same bytes, signature and key) is not
        checked again.
        """
        seen = VERIFIED.key(self)
        if seen in VERIFIED:
            return
        self._verify()
        VERIFIED.add(seen)

    def _verify(self) -> None:
        key = self.record.node_public_key
        verifier = _VERIFIERS.get(key)
        if verifier is None:
            try:
                verifier = Ed25519Verifier(self.record.public_key)
            except (KeyError_, ValueError) as exc:
                raise SignatureError(f"record public key is unusable: {exc}") from None
            if len(_VERIFIERS) >= _MAX_CACHED_VERIFIERS:
                _VERIFIERS.clear()
            _VERIFIERS[key] = verifier
        verifier.verify(self.signature, self.record.canonical())

    def to_json(self) -> dict[str, Any]:
        return {"record": self.record.to_json(), "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, data: Any) -> SignedRecord:
        if not isinstance(data, Mapping) or set(data) != {"record", "signature"}:
            raise RecordError("a signed record is an object with 'record' and 'signature'")
        sig = data["signature"]
        if not isinstance(sig, str) or len(sig) != 128:
            raise RecordError("record signature must be 128 hex characters")
        try:
            raw = bytes.fromhex(sig)
        except ValueError:
            raise RecordError("record signature is not hex") from None
        return cls(Record.from_json(data["record"]), raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedRecord:
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError("signed record is too large")
        try:
            return cls.from_json(canonical_loads(data))
        except EncodingError as exc:
            raise RecordError(f"signed record is not valid JSON: {exc}") from None

    def to_bytes(self) -> bytes:
        # The canonical form of {"record": ..., "signature": ...}: keys in order, and
        # the record's own canonical bytes inside (a test checks the equality).
        return b'{"record":%s,"signature":"%s"}' % (
            self.record.canonical(),
            self.signature.hex().encode(),
        )


def verify_records(records: Sequence[SignedRecord]) -> None:
    """Verify every record's signature, in order.

    Raises :class:`SignatureError` naming the first bad record.

    This is the default *record verifier* of a :class:`~pyrsia_core.Ledger`; a node may
    inject one that spreads the same checks over several processes.
    """
    for i, sr in enumerate(records):
        try:
            sr.verify()
        except SignatureError as exc:
            raise SignatureError(f"record {i} ({sr.record.id}): {exc}") from None
