from __future__ import annotations

import pytest
from core_helpers import artifact_records, signer
from hypothesis import given
from hypothesis import strategies as st
from pyrsia_core.errors import RecordError, SignatureError

from pyrsia_core import RECORD_FIELDS, Operation, Record, SignedRecord


def test_record_has_exactly_the_seed_fields_and_types() -> None:
    sr = artifact_records(signer(1), 1)[0]
    data = sr.record.to_json()
    assert list(data) == [
        "id",
        "package_type",
        "package_specific_id",
        "num_artifacts",
        "package_specific_artifact_id",
        "artifact_hash",
        "source_hash",
        "artifact_id",
        "source_id",
        "timestamp",
        "operation",
        "node_id",
        "node_public_key",
    ]
    for name, typ in RECORD_FIELDS:
        assert type(data[name]) is typ
    # node_id is really the SHA-256 of the real public key.
    import hashlib

    assert data["node_id"] == hashlib.sha256(bytes.fromhex(data["node_public_key"])).hexdigest()
    assert data["node_public_key"] == signer(1).public_key.hex


def test_signed_record_round_trip_and_verification() -> None:
    sr = artifact_records(signer(1), 1)[0]
    again = SignedRecord.from_bytes(sr.to_bytes())
    assert again == sr
    again.verify()
    forged = SignedRecord(sr.record, bytes(64))
    with pytest.raises(SignatureError):
        forged.verify()
    # Changing any field breaks the signature.
    d = sr.record.to_json()
    d["package_specific_id"] = "alpine:evil"
    with pytest.raises(SignatureError):
        SignedRecord(Record.from_json(d), sr.signature).verify()


def test_cannot_sign_a_record_naming_another_node() -> None:
    sr = artifact_records(signer(1), 1)[0]
    with pytest.raises(RecordError):
        SignedRecord.sign(sr.record, signer(2))


def _valid() -> dict[str, object]:
    return artifact_records(signer(1), 1)[0].record.to_json()


@pytest.mark.parametrize("field", [name for name, _ in RECORD_FIELDS])
def test_missing_field_is_rejected(field: str) -> None:
    d = _valid()
    del d[field]
    with pytest.raises(RecordError, match=field):
        Record.from_json(d)


@pytest.mark.parametrize("field", [name for name, _ in RECORD_FIELDS])
def test_mistyped_field_is_rejected(field: str) -> None:
    d = _valid()
    d[field] = 7 if isinstance(d[field], str) else "7"
    with pytest.raises(RecordError):
        Record.from_json(d)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("artifact_hash", "A" * 64),
        ("artifact_hash", "abc"),
        ("source_hash", "x"),
        ("operation", "Delete"),
        ("node_id", "0" * 64),  # does not match the public key
        ("id", "not-a-uuid"),
        ("num_artifacts", 0),
        ("timestamp", -1),
        ("package_specific_id", ""),
        ("package_specific_id", "a\nb"),
    ],
)
def test_bad_values_are_rejected(field: str, value: object) -> None:
    d = _valid()
    d[field] = value
    with pytest.raises(RecordError):
        Record.from_json(d)


def test_extra_field_and_non_object_are_rejected() -> None:
    d = _valid()
    d["extra"] = 1
    with pytest.raises(RecordError, match="extra"):
        Record.from_json(d)
    with pytest.raises(RecordError):
        Record.from_json([1, 2])
    with pytest.raises(RecordError):
        SignedRecord.from_bytes(b'{"record": 1}')
    with pytest.raises(RecordError):
        SignedRecord.from_bytes(b"\x00garbage")


def test_node_change_records() -> None:
    admin, newcomer = signer(1), signer(2)
    r = Record.node_change(signer=admin, subject=newcomer.public_key, timestamp=1)
    assert r.operation == Operation.ADD_NODE and r.package_specific_id == newcomer.node_id
    d = r.to_json()
    d["package_specific_id"] = "f" * 64  # does not match the key
    with pytest.raises(RecordError):
        Record.from_json(d)


@given(st.dictionaries(st.text(max_size=10), st.one_of(st.text(), st.integers(), st.none())))
def test_arbitrary_objects_only_raise_record_error(d: dict[str, object]) -> None:
    with pytest.raises(RecordError):
        Record.from_json(d)


def test_signed_record_bytes_are_canonical() -> None:
    from pyrsia_core import canonical_json

    for sr in artifact_records(signer(3), 5):
        assert sr.to_bytes() == canonical_json(sr.to_json())


def test_a_verified_signature_is_remembered_only_for_the_same_bytes() -> None:
    import attrs
    from pyrsia_core._records import VERIFIED

    (sr,) = artifact_records(signer(7), 1)
    sr.verify()
    assert VERIFIED.key(sr) in VERIFIED
    sr.verify()  # remembered: not checked again
    # Same id and signature, other content: a different key, checked, refused.
    forged = SignedRecord(attrs.evolve(sr.record, artifact_hash="ab" * 32), sr.signature)
    assert VERIFIED.key(forged) not in VERIFIED
    with pytest.raises(SignatureError):
        forged.verify()
    with pytest.raises(SignatureError):
        forged.verify()  # a failure is never remembered
    # Same record, another signature.
    other = SignedRecord(sr.record, bytes(64))
    with pytest.raises(SignatureError):
        other.verify()
