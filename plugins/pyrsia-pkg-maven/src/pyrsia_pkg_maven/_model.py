"""Maven coordinates, repository paths, POMs and ``maven-metadata.xml`` (pure, no I/O)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Final

import attrs

__all__ = [
    "CHECKSUMS",
    "POM_TYPE",
    "FileRequest",
    "Gav",
    "MetadataRequest",
    "Pom",
    "PomError",
    "metadata_xml",
    "parse_metadata",
    "parse_path",
    "version_key",
]

POM_TYPE: Final = "application/xml"
MAX_POM = 4 * 1024 * 1024
MAX_METADATA = 4 * 1024 * 1024
#: Checksum files Maven clients ask for, computed by the node from verified bytes.
CHECKSUMS: Final = ("sha1", "md5", "sha256", "sha512")
_SEGMENT = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_GROUP = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_ARTIFACT = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_VERSION = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.+-]*[A-Za-z0-9_+])?")
_CLASSIFIER = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_EXTENSION = re.compile(r"[a-z0-9]+(?:\.[a-z0-9]+)*")
#: Packaging -> file extension of the main artifact (Maven's default artifact handlers).
_PACKAGING_EXT: Final = {"maven-plugin": "jar", "bundle": "jar", "ejb": "jar", "jar": "jar",
                         "war": "war", "ear": "ear", "rar": "rar", "aar": "aar",
                         "java-source": "jar", "javadoc": "jar", "test-jar": "jar"}


class PomError(ValueError):
    """A POM (or ``maven-metadata.xml``) that is not well-formed or names another GAV."""


@attrs.frozen
class Gav:
    """``group:artifact:version``; ``parse`` checks every part (no ``..``, no slashes)."""

    group: str
    artifact: str
    version: str

    @classmethod
    def parse(cls, text: str) -> Gav:
        if not isinstance(text, str) or len(text) > 512:
            raise ValueError("a GAV is a string of at most 512 characters")
        parts = text.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"invalid GAV {text!r:.100}: expected 'group:artifact:version', "
                             "e.g. junit:junit:4.13.2")
        group, artifact, version = parts
        if not _GROUP.fullmatch(group) or ".." in group:
            raise ValueError(f"invalid group id {group!r:.100} in GAV {text!r:.100}")
        if not _ARTIFACT.fullmatch(artifact) or ".." in artifact:
            raise ValueError(f"invalid artifact id {artifact!r:.100} in GAV {text!r:.100}")
        if not _VERSION.fullmatch(version) or ".." in version:
            raise ValueError(f"invalid version {version!r:.100} in GAV {text!r:.100}")
        if version.endswith("SNAPSHOT"):
            raise ValueError(f"SNAPSHOT versions change over time and are not served: "
                             f"{text!r:.100}")
        return cls(group, artifact, version)

    def __str__(self) -> str:
        return f"{self.group}:{self.artifact}:{self.version}"

    @property
    def directory(self) -> str:
        return f"{self.group.replace('.', '/')}/{self.artifact}/{self.version}"

    @property
    def base_name(self) -> str:
        return f"{self.artifact}-{self.version}"

    def path(self, extension: str, classifier: str = "") -> str:
        """Repository path of one file of this GAV (``org/x/a/1/a-1.jar``)."""
        suffix = f"-{classifier}" if classifier else ""
        return f"{self.directory}/{self.base_name}{suffix}.{extension}"

    @property
    def pom_path(self) -> str:
        return self.path("pom")


@attrs.frozen
class FileRequest:
    """A request for a file of a GAV (``checksum``: ``sha1`` etc. when a checksum is asked)."""

    gav: Gav
    path: str
    checksum: str | None


@attrs.frozen
class MetadataRequest:
    """``<segments>/maven-metadata.xml``: artifact level (``g/a``) or group level (``g``)."""

    segments: tuple[str, ...]
    checksum: str | None

    @property
    def upstream_path(self) -> str:
        return "/".join((*self.segments, "maven-metadata.xml"))

    @property
    def as_artifact(self) -> tuple[str, str] | None:
        """``(group, artifact)`` if the path can name an artifact's metadata."""
        if len(self.segments) < 2:
            return None
        return ".".join(self.segments[:-1]), self.segments[-1]


def _split_checksum(name: str) -> tuple[str, str | None]:
    for algo in CHECKSUMS:
        if name.endswith("." + algo):
            return name[: -len(algo) - 1], algo
    return name, None


def parse_path(path: str) -> FileRequest | MetadataRequest:
    """A repository path (below ``/maven2/``) -> what it asks for; ``ValueError`` if invalid."""
    if len(path) > 1024:
        raise ValueError("path too long")
    segments = path.strip("/").split("/")
    if not segments or any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"invalid repository path {path!r:.200}")
    name, checksum = _split_checksum(segments[-1])
    if name == "maven-metadata.xml":
        for s in segments[:-1]:
            if not _ARTIFACT.fullmatch(s):
                raise ValueError(f"invalid repository path {path!r:.200}")
        if not segments[:-1]:
            raise ValueError("maven-metadata.xml needs a group or artifact path")
        return MetadataRequest(tuple(segments[:-1]), checksum)
    if len(segments) < 4:
        raise ValueError(f"not a file of a GAV: {path!r:.200} (group/artifact/version/file)")
    *group, artifact, version, _ = segments
    gav = Gav.parse(f"{'.'.join(group)}:{artifact}:{version}")
    base = gav.base_name
    if not name.startswith(base):
        raise ValueError(f"file {name!r:.200} does not belong to {gav}")
    rest = name[len(base):]
    if rest.startswith("."):
        ext = rest[1:]
    elif rest.startswith("-") and "." in rest:
        classifier, _, ext = rest[1:].partition(".")
        if not _CLASSIFIER.fullmatch(classifier):
            raise ValueError(f"invalid classifier in {name!r:.200}")
    else:
        raise ValueError(f"file {name!r:.200} does not belong to {gav}")
    if not _EXTENSION.fullmatch(ext):
        raise ValueError(f"invalid file extension in {name!r:.200}")
    return FileRequest(gav, f"{gav.directory}/{name}", checksum)


def _parse_xml(content: bytes, limit: int, what: str) -> ET.Element:
    if not isinstance(content, bytes) or len(content) > limit:
        raise PomError(f"{what} is not bytes or larger than {limit} bytes")
    head = content[:4096].lower()
    if b"<!doctype" in head or b"<!entity" in content.lower():
        raise PomError(f"{what} has a DTD or entities; refused")
    try:
        return ET.fromstring(content)
    except Exception as exc:  # ParseError is a SyntaxError; expat may raise others
        raise PomError(f"{what} is not well-formed XML: {type(exc).__name__}") from None


def _local(tag: object) -> str:
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _child_text(elem: ET.Element, name: str) -> str | None:
    for child in elem:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def _child(elem: ET.Element, name: str) -> ET.Element | None:
    for child in elem:
        if _local(child.tag) == name:
            return child
    return None


@attrs.frozen
class Pom:
    """The few POM facts a build needs: coordinates and packaging."""

    group: str | None
    artifact: str
    version: str | None
    packaging: str

    @classmethod
    def parse(cls, content: bytes) -> Pom:
        root = _parse_xml(content, MAX_POM, "POM")
        if _local(root.tag) != "project":
            raise PomError("not a POM: the root element is not <project>")
        artifact = _child_text(root, "artifactId")
        if not artifact:
            raise PomError("POM has no artifactId")
        group = _child_text(root, "groupId")
        version = _child_text(root, "version")
        parent = _child(root, "parent")
        if parent is not None:
            group = group or _child_text(parent, "groupId")
            version = version or _child_text(parent, "version")
        packaging = _child_text(root, "packaging") or "jar"
        return cls(group, artifact, version, packaging)

    def check(self, gav: Gav) -> None:
        """Raise :class:`PomError` unless this POM describes ``gav``."""
        if self.artifact != gav.artifact:
            raise PomError(f"POM of {gav} names artifactId {self.artifact!r:.100}")
        if self.version is not None and self.version != gav.version:
            raise PomError(f"POM of {gav} names version {self.version!r:.100}")
        if self.group is not None and self.group != gav.group:
            raise PomError(f"POM of {gav} names groupId {self.group!r:.100}")

    @property
    def extension(self) -> str | None:
        """Extension of the main artifact; ``None`` for ``pom`` packaging."""
        if self.packaging == "pom":
            return None
        return _PACKAGING_EXT.get(self.packaging, "jar")


_NUM = re.compile(r"\d+")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key close to Maven's ordering (numbers numerically; qualifiers before release)."""
    out: list[tuple[int, int | str]] = []
    for part in re.split(r"[.\-]", version):
        if _NUM.fullmatch(part):
            out.append((2, int(part)))
        elif part.lower() in ("ga", "final", "release", ""):
            out.append((1, ""))
        else:
            out.append((0, part.lower()))
    return tuple(out)


@attrs.frozen
class Metadata:
    """What an upstream ``maven-metadata.xml`` says: versions, or a group's plugin prefixes."""

    versions: tuple[str, ...] = ()
    plugins: tuple[tuple[str, str, str], ...] = ()  # (name, prefix, artifactId)
    last_updated: str = ""


def parse_metadata(content: bytes) -> Metadata:
    """Parse a ``maven-metadata.xml`` (size-capped, no DTDs or entities); raise ``PomError``."""
    root = _parse_xml(content, MAX_METADATA, "maven-metadata.xml")
    if _local(root.tag) != "metadata":
        raise PomError("not maven-metadata.xml: the root element is not <metadata>")
    versions: list[str] = []
    last = ""
    versioning = _child(root, "versioning")
    if versioning is not None:
        block = _child(versioning, "versions")
        for v in block if block is not None else ():
            text = (v.text or "").strip()
            if _local(v.tag) == "version" and _VERSION.fullmatch(text):
                versions.append(text)
        last = _child_text(versioning, "lastUpdated") or ""
    plugins: list[tuple[str, str, str]] = []
    block = _child(root, "plugins")
    for p in block if block is not None else ():
        prefix, artifact = _child_text(p, "prefix") or "", _child_text(p, "artifactId") or ""
        if _ARTIFACT.fullmatch(prefix) and _ARTIFACT.fullmatch(artifact):
            plugins.append(((_child_text(p, "name") or "")[:200], prefix, artifact))
    return Metadata(tuple(versions), tuple(plugins), last if last.isdigit() else "")


def metadata_xml(
    *,
    group: str,
    artifact: str | None,
    versions: Iterable[str] = (),
    plugins: Iterable[tuple[str, str, str]] = (),
    last_updated: str = "",
) -> bytes:
    """A ``maven-metadata.xml`` the node writes itself (never the upstream's bytes)."""
    root = ET.Element("metadata")
    ET.SubElement(root, "groupId").text = group
    if artifact is not None:
        ET.SubElement(root, "artifactId").text = artifact
        ordered = sorted(set(versions), key=version_key)
        versioning = ET.SubElement(root, "versioning")
        if ordered:
            ET.SubElement(versioning, "latest").text = ordered[-1]
            releases = [v for v in ordered if not v.endswith("SNAPSHOT")]
            if releases:
                ET.SubElement(versioning, "release").text = releases[-1]
        block = ET.SubElement(versioning, "versions")
        for v in ordered:
            ET.SubElement(block, "version").text = v
        if last_updated:
            ET.SubElement(versioning, "lastUpdated").text = last_updated
    else:
        block = ET.SubElement(root, "plugins")
        for name, prefix, art in plugins:
            p = ET.SubElement(block, "plugin")
            ET.SubElement(p, "name").text = name
            ET.SubElement(p, "prefix").text = prefix
            ET.SubElement(p, "artifactId").text = art
    ET.indent(root)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body + b"\n"
