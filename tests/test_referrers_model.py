"""The referrers index and the tag schema (pure: :mod:`pyrsia_pkg_docker._referrers`)."""

from __future__ import annotations

import json

from pyrsia_pkg_docker._referrers import (
    referrer_of,
    referrers_index,
    tag_schema_digest,
    tag_schema_tag,
)

from pyrsia_core import Digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SUBJECT = Digest.of(b"subject")


def _manifest(**extra: object) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/x-config", "digest": str(Digest.of(b"{}")),
                   "size": 2},
        "layers": [],
        **extra,
    }
    return json.dumps(doc).encode()


def test_referrer_of_reads_subject_artifact_type_and_annotations() -> None:
    body = _manifest(subject={"mediaType": OCI_MANIFEST, "digest": str(SUBJECT), "size": 7},
                     artifactType="application/x-sig", annotations={"a": "b", "n": 1})
    r = referrer_of(body, Digest.of(body))
    assert r is not None
    assert (r.subject, r.artifact_type, r.size) == (SUBJECT, "application/x-sig", len(body))
    assert r.annotations == {"a": "b"}  # only string values, as descriptors carry
    assert r.descriptor() == {"mediaType": OCI_MANIFEST, "digest": str(Digest.of(body)),
                              "size": len(body), "artifactType": "application/x-sig",
                              "annotations": {"a": "b"}}


def test_artifact_type_falls_back_to_the_config_media_type() -> None:
    body = _manifest(subject={"mediaType": OCI_MANIFEST, "digest": str(SUBJECT), "size": 7})
    r = referrer_of(body, Digest.of(body))
    assert r is not None and r.artifact_type == "application/x-config"
    assert "annotations" not in r.descriptor()


def test_not_referrers() -> None:
    for body in (b"not json", b"[]", _manifest(), _manifest(subject={"digest": "sha256:zz"}),
                 _manifest(subject="x"), json.dumps({"schemaVersion": 1, "subject": {
                     "digest": str(SUBJECT)}}).encode(),
                 json.dumps({"schemaVersion": 2, "mediaType": "text/plain",
                             "subject": {"digest": str(SUBJECT)}}).encode()):
        assert referrer_of(body, Digest.of(body)) is None, body


def test_index_is_the_same_bytes_for_the_same_set() -> None:
    bodies = [_manifest(subject={"mediaType": OCI_MANIFEST, "digest": str(SUBJECT), "size": 7},
                        artifactType=f"application/x-{i}") for i in range(3)]
    refs = [r for b in bodies if (r := referrer_of(b, Digest.of(b))) is not None]
    one = referrers_index(refs)
    assert one == referrers_index(list(reversed(refs))) == referrers_index(refs + refs[:1])
    doc = json.loads(one)
    assert doc["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [d["digest"] for d in doc["manifests"]] == sorted(str(r.digest) for r in refs)
    assert json.loads(referrers_index([]))["manifests"] == []


def test_tag_schema() -> None:
    assert tag_schema_tag(SUBJECT) == f"sha256-{SUBJECT.hex}"
    assert tag_schema_digest(tag_schema_tag(SUBJECT)) == SUBJECT
    for tag in ("latest", "sha256-abc", f"sha256-{SUBJECT.hex}x", f"sha512-{SUBJECT.hex}",
                f"sha256-{SUBJECT.hex.upper()}"):
        assert tag_schema_digest(tag) is None
