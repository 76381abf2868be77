"""OCI 1.1 referrers (pure): a manifest's ``subject``, the referrers index, the tag schema.

A referrer (a signature, an SBOM...) is a manifest whose ``subject`` names another
manifest. The node logs referrers as artifacts of the image they refer to (``alpine@<digest>``,
the seed's record layout); the subject -> referrer relation is in the referrer manifest
itself, so the referrers index is computed from logged manifests. Registries without the
referrers API keep the same index under the tag ``<alg>-<hex>`` (the tag schema).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs
from pyrsia_core.errors import DigestError

from pyrsia_core import Digest

from ._model import IMAGE_TYPES, OCI_INDEX, OCI_MANIFEST

__all__ = [
    "MAX_REFERRERS",
    "Referrer",
    "referrer_of",
    "referrers_index",
    "tag_schema_digest",
    "tag_schema_tag",
]

#: Most referrers one manifest may have (each is a logged artifact of the image).
MAX_REFERRERS: Final = 64
_TAG_SCHEMA: Final = re.compile(r"sha256-([0-9a-f]{64})", re.ASCII)


@attrs.frozen
class Referrer:
    """A referrer manifest as the referrers index lists it."""

    subject: Digest
    digest: Digest
    size: int
    media_type: str
    artifact_type: str
    annotations: Mapping[str, str] | None = None

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest),
                             "size": self.size, "artifactType": self.artifact_type}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


def referrer_of(content: bytes, digest: Digest) -> Referrer | None:
    """The referrer ``content`` (a manifest with a ``subject``) is, or ``None``.

    As the image spec says, a manifest without ``artifactType`` has its config's media type
    as artifact type. Anything that is not a manifest with a valid subject is ``None``.
    """
    try:
        doc: Any = json.loads(content)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        return None
    subject = doc.get("subject")
    if not isinstance(subject, dict) or not isinstance(subject.get("digest"), str):
        return None
    try:
        subject_digest = Digest.parse(subject["digest"])
    except DigestError:
        return None
    media_type = doc.get("mediaType")
    if media_type is None and "config" in doc:
        media_type = OCI_MANIFEST
    if media_type not in IMAGE_TYPES and media_type != OCI_INDEX:
        return None
    artifact_type = doc.get("artifactType")
    if not isinstance(artifact_type, str) or not artifact_type:
        config = doc.get("config")
        artifact_type = config.get("mediaType") if isinstance(config, dict) else None
        if not isinstance(artifact_type, str):
            artifact_type = ""
    raw = doc.get("annotations")
    annotations = ({k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}
                   if isinstance(raw, dict) else None)
    return Referrer(subject_digest, digest, len(content), str(media_type), artifact_type,
                    annotations or None)


def referrers_index(referrers: Iterable[Referrer]) -> bytes:
    """The OCI image index listing ``referrers``: the same bytes (so the same digest) for
    the same set, whatever the order found."""
    unique = {r.digest: r for r in referrers}
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
           "manifests": [unique[d].descriptor() for d in sorted(unique, key=str)]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def tag_schema_tag(digest: Digest) -> str:
    """The tag schema's tag for ``digest``'s referrers: ``sha256-<hex>``."""
    return f"sha256-{digest.hex}"


def tag_schema_digest(tag: str) -> Digest | None:
    """The digest a tag-schema tag (``sha256-<hex>``) names, or ``None`` for another tag."""
    m = _TAG_SCHEMA.fullmatch(tag)
    return Digest.parse(f"sha256:{m[1]}") if m else None
