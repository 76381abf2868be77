"""A minimal third-party Pyrsia package type: "hello" packages.

Only :mod:`pyrsia_core` is used. The package type is pure and synchronous: it
normalises package ids and lists the digests a manifest points to. Every kind of
bad input raises a ``ValueError`` (pyrsia's conformance suite checks this).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pyrsia_core.interfaces import PackageType

from pyrsia_core import Digest

__all__ = ["MANIFEST_TYPE", "HelloPackageType"]

MANIFEST_TYPE = "application/vnd.pyrsia.hello.v1+json"
MAX_MANIFEST = 1 << 20
MAX_FILES = 1000
_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
_VERSION = re.compile(r"[A-Za-z0-9]+(?:[._+-][A-Za-z0-9]+)*")
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")


class HelloPackageType(PackageType):
    name = "hello"
    record_type = "Hello"

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> HelloPackageType:
        """The entry point's factory: pyrsia calls it with the plugin's config."""
        return cls()

    def parse_package_id(self, text: str) -> str:
        """``Greeting:1.0`` -> ``greeting:1.0`` (names are lower case; versions kept)."""
        if not isinstance(text, str) or len(text) > 256:
            raise ValueError("a hello package id is a string of at most 256 characters")
        name, sep, version = text.strip().partition(":")
        name = name.lower()
        if not sep or not _NAME.fullmatch(name) or not _VERSION.fullmatch(version):
            raise ValueError(f"invalid hello package id {text!r:.80}: expected 'name:version'")
        return f"{name}:{version}"

    def references(self, content: bytes, media_type: str) -> list[tuple[Digest, str]]:
        """The ``files`` a hello manifest lists, in order."""
        if media_type != MANIFEST_TYPE:
            raise ValueError(f"not a hello manifest: media type {media_type!r:.80}")
        if len(content) > MAX_MANIFEST:
            raise ValueError("hello manifest is too large")
        try:
            doc: Any = json.loads(content)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"hello manifest is not JSON: {type(exc).__name__}") from None
        if not isinstance(doc, dict) or doc.get("schemaVersion") != 1:
            raise ValueError("hello manifest must be an object with schemaVersion 1")
        if not isinstance(doc.get("name"), str) or not isinstance(doc.get("version"), str):
            raise ValueError("hello manifest needs string 'name' and 'version'")
        self.parse_package_id(f"{doc['name']}:{doc['version']}")
        files = doc.get("files")
        if not isinstance(files, list) or len(files) > MAX_FILES:
            raise ValueError(f"hello manifest needs a list of at most {MAX_FILES} 'files'")
        out: list[tuple[Digest, str]] = []
        for entry in files:
            if not isinstance(entry, dict):
                raise ValueError("each hello manifest file must be an object")
            digest, file_type = entry.get("digest"), entry.get("mediaType")
            if not isinstance(digest, str) or not isinstance(file_type, str):
                raise ValueError("each hello manifest file needs string 'digest' and 'mediaType'")
            if not _MEDIA_TYPE.fullmatch(file_type):
                raise ValueError(f"invalid media type {file_type!r:.80}")
            out.append((Digest.parse(digest), file_type))  # DigestError is a ValueError
        return out
