"""Docker/OCI references, media types and manifest parsing (pure)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import attrs
from pyrsia_core.errors import DigestError, PyrsiaError

from pyrsia_core import Digest

__all__ = [
    "ALL_MANIFEST_TYPES",
    "DOCKER_HUB",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Descriptor",
    "ImageRef",
    "Manifest",
    "ManifestError",
    "ReferenceError_",
    "choose_platform",
    "logged_name",
    "reference_text",
    "split_registry",
    "validate_registry",
    "validate_repository",
    "validate_tag",
]

DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
INDEX_TYPES: Final = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
IMAGE_TYPES: Final = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
ALL_MANIFEST_TYPES: Final = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024
MAX_NAME_LENGTH: Final = 255

_COMPONENT: Final = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY: Final = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
#: Docker Hub, the default registry: its images keep their short ids (``alpine:3.16.2``).
DOCKER_HUB: Final = "docker.io"
DOCKER_HUB_ALIASES: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HOST_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_REGISTRY: Final = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*(?::[0-9]{{1,5}})?")


class ReferenceError_(PyrsiaError, ValueError):
    """A repository name, tag or image reference is invalid."""


class ManifestError(PyrsiaError, ValueError):
    """Manifest bytes are not a manifest we understand."""


def validate_repository(name: str) -> str:
    """Return ``name`` if it is a valid repository name (OCI distribution grammar), else raise."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ReferenceError_(f"repository name must be 1 to {MAX_NAME_LENGTH} characters")
    if not _REPOSITORY.fullmatch(name):
        raise ReferenceError_(f"invalid repository name {name[:80]!r}")
    return name


def looks_like_registry(component: str) -> bool:
    """``True`` if a name's first component names a registry (``ghcr.io``, ``host:5000``,
    ``localhost``), as Docker reads it: Docker Hub namespaces have no ``.`` or ``:``."""
    return "." in component or ":" in component or component == "localhost"


def validate_registry(host: str) -> str:
    """Return the registry host name, lower case (Docker Hub's aliases: ``docker.io``),
    or raise if it is not a host name with an optional port."""
    host = host.lower()
    if len(host) > 253 or not _REGISTRY.fullmatch(host):
        raise ReferenceError_(f"invalid registry host name {host[:80]!r}")
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def split_registry(name: str) -> tuple[str | None, str]:
    """``ghcr.io/org/app`` -> ``("ghcr.io", "org/app")``; ``library/alpine`` -> ``(None, …)``."""
    first, sep, rest = name.partition("/")
    if sep and looks_like_registry(first):
        return validate_registry(first), rest
    return None, name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid tag (``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``), else raise."""
    if not _TAG.fullmatch(tag):
        raise ReferenceError_(f"invalid tag {tag[:80]!r}")
    return tag


@attrs.frozen
class ImageRef:
    """``repository`` (``library/alpine``) and a tag or a digest, of ``registry``
    (``docker.io`` unless the reference names another: ``ghcr.io/org/app:1.0``)."""

    repository: str
    tag: str | None = None
    digest: Digest | None = None
    registry: str = DOCKER_HUB

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        """Parse ``alpine:3.16.2``, ``docker.io/library/alpine@sha256:…``, ``some/repo:v1``."""
        if not isinstance(text, str) or not text or len(text) > 512:
            raise ReferenceError_("an image reference is a non-empty string")
        registry, rest = split_registry(text)
        registry = registry or DOCKER_HUB
        digest: Digest | None = None
        if "@" in rest:
            rest, _, d = rest.partition("@")
            try:
                digest = Digest.parse(d)
            except DigestError as exc:
                raise ReferenceError_(str(exc)) from None
        tag: str | None = None
        name, sep, maybe_tag = rest.rpartition(":")
        if sep and "/" not in maybe_tag:
            rest, tag = name, validate_tag(maybe_tag)
        if tag is None and digest is None:
            tag = "latest"
        if "/" not in rest and registry == DOCKER_HUB:
            rest = f"library/{rest}"
        return cls(validate_repository(rest), tag, digest, registry)

    @property
    def reference(self) -> str:
        """The manifest reference: the digest if given, else the tag."""
        return str(self.digest) if self.digest else str(self.tag)

    @property
    def short_name(self) -> str:
        """The repository as users write it and the log names it: ``alpine`` for Docker
        Hub's ``library/alpine``; another registry's with its host (``ghcr.io/org/app``)."""
        if self.registry != DOCKER_HUB:
            return f"{self.registry}/{self.repository}"
        return self.repository.removeprefix("library/")

    @property
    def package_id(self) -> str:
        """``package_specific_id`` in log records: ``alpine:3.16.2`` (or ``alpine@sha256:…``)."""
        if self.tag is not None:
            return f"{self.short_name}:{self.tag}"
        return f"{self.short_name}@{self.digest}"

    def artifact_id(self, digest: Digest) -> str:
        """``package_specific_artifact_id`` of an artifact found by digest."""
        return f"{self.short_name}@{digest}"


def logged_name(package_or_artifact_id: str) -> str:
    """The image name of a logged id: ``ghcr.io:5000/org/app`` of
    ``ghcr.io:5000/org/app:1.0`` or ``…@sha256:…``; ``alpine`` of ``alpine:3.16.2``."""
    name = package_or_artifact_id.partition("@")[0]
    head, sep, tail = name.rpartition(":")
    return head if sep and "/" not in tail else name


def reference_text(repository: str, reference: str) -> str:
    """``library/alpine:3.16.2``, or ``library/alpine@sha256:…`` for a digest reference."""
    sep = "@" if ":" in reference else ":"
    return f"{repository}{sep}{reference}"


@attrs.frozen
class Descriptor:
    """An OCI content descriptor: media type, digest, size (and platform in an index)."""

    media_type: str
    digest: Digest
    size: int
    platform: Mapping[str, str] | None = None


@attrs.frozen
class Manifest:
    """What we need of a manifest: its type and the descriptors it points to."""

    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def children(self) -> tuple[Descriptor, ...]:
        if self.is_index:
            return self.manifests
        return ((self.config,) if self.config else ()) + self.layers

    @classmethod
    def parse(cls, data: bytes, content_type: str | None = None) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError("manifest is larger than 4 MiB")
        try:
            doc: Any = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ManifestError(f"manifest is not JSON: {type(exc).__name__}: {exc}") from None
        if not isinstance(doc, dict):
            raise ManifestError("manifest is not a JSON object")
        if doc.get("schemaVersion") != 2:
            raise ManifestError("only schemaVersion 2 manifests are supported")
        media_type = doc.get("mediaType") or content_type
        if media_type not in ALL_MANIFEST_TYPES:
            if "manifests" in doc:
                media_type = OCI_INDEX
            elif "config" in doc:
                media_type = OCI_MANIFEST
            else:
                raise ManifestError(f"unknown manifest media type {media_type!r:.80}")
        if media_type in INDEX_TYPES:
            manifests = tuple(_descriptor(d) for d in _list(doc, "manifests"))
            return cls(media_type, None, (), manifests)
        config = _descriptor(doc.get("config"))
        layers = tuple(_descriptor(d) for d in _list(doc, "layers"))
        return cls(media_type, config, layers, ())


def _list(doc: Mapping[str, Any], key: str) -> Sequence[Any]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise ManifestError(f"manifest field {key!r} must be a list")
    if len(value) > 10_000:
        raise ManifestError(f"manifest field {key!r} is too long")
    return value


def _descriptor(d: Any) -> Descriptor:
    if not isinstance(d, dict):
        raise ManifestError("manifest descriptor must be an object")
    media_type, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
    if not isinstance(media_type, str) or type(size) is not int or size < 0:
        raise ManifestError("manifest descriptor needs mediaType and a non-negative size")
    try:
        parsed = Digest.parse(cast(str, digest))  # a non-string is a DigestError too
    except DigestError as exc:
        raise ManifestError(f"manifest descriptor digest: {exc}") from None
    platform = d.get("platform")
    plat: dict[str, str] | None = None
    if isinstance(platform, dict):
        plat = {k: v for k, v in platform.items() if isinstance(v, str)}
    return Descriptor(media_type, parsed, size, plat)


def choose_platform(
    manifest: Manifest, *, os: str = "linux", architecture: str = "amd64"
) -> Descriptor | None:
    """The entry of an index for ``os``/``architecture``, or ``None``."""
    for d in manifest.manifests:
        p = d.platform or {}
        if p.get("os") == os and p.get("architecture") == architecture:
            return d
    return None


