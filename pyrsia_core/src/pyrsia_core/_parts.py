"""Part lists: the SHA-256 of each fixed-size part of a large blob (DESIGN §6, swarm).

A blob's digest can only be checked once every byte has arrived. To let nodes that
fetch the same large blob at once serve each other the parts they already hold, the
build node also logs a *part list* for it: a small canonical JSON document naming
the blob, its size, the part size and each part's SHA-256. The part list is itself
an artifact of the log (a record of package type :data:`PARTS_RECORD_TYPE` whose
``package_specific_id`` is the blob's digest and whose ``artifact_hash`` is the
document's SHA-256), committed with the quorum's certificate like any other; so a
part is verified against the log before it is stored or served on, and the
validators rebuild the list from their own copy of the blob before they vote.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any, Final

import attrs

from ._canonical import canonical_json, canonical_loads
from ._digest import Digest
from .errors import EncodingError

__all__ = [
    "DEFAULT_PART_SIZE",
    "PARTS_RECORD_TYPE",
    "PartHasher",
    "PartList",
    "PartListError",
]

#: ``package_type`` of the records that log part lists.
PARTS_RECORD_TYPE: Final = "Parts"
DEFAULT_PART_SIZE: Final = 1 << 20
MIN_PART_SIZE: Final = 64 * 1024
MAX_PART_SIZE: Final = 64 << 20
MAX_PARTS: Final = 1 << 20
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


class PartListError(ValueError):
    """A part list document that breaks a rule."""


class PartHasher:
    """Builds a :class:`PartList` from a blob's bytes fed in chunks of any sizes."""

    def __init__(self, part_size: int = DEFAULT_PART_SIZE) -> None:
        self.part_size = part_size
        self.parts: list[str] = []
        self.size = 0
        self._h = hashlib.sha256()
        self._filled = 0

    def update(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        self.size += len(view)
        while view:
            take = min(self.part_size - self._filled, len(view))
            self._h.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.part_size:
                self.parts.append(self._h.hexdigest())
                self._h, self._filled = hashlib.sha256(), 0

    def finish(self, blob: Digest) -> PartList:
        if self._filled:
            self.parts.append(self._h.hexdigest())
            self._h, self._filled = hashlib.sha256(), 0
        return PartList(blob, self.size, self.part_size, self.parts)


def _hashes(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class PartList:
    """``{"blob", "size", "part_size", "parts": [hex, ...]}``: every part but the last
    is ``part_size`` bytes."""

    blob: Digest
    size: int
    part_size: int
    parts: tuple[str, ...] = attrs.field(converter=_hashes, repr=False)

    def __attrs_post_init__(self) -> None:
        if type(self.size) is not int or self.size < 1:
            raise PartListError("a part list's blob size is a positive integer")
        if type(self.part_size) is not int or not (
            MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE
        ):
            raise PartListError(
                f"part size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes"
            )
        expected = -(-self.size // self.part_size)
        if expected > MAX_PARTS or len(self.parts) != expected:
            raise PartListError(
                f"a blob of {self.size} bytes in parts of {self.part_size} has {expected} "
                f"parts, not {len(self.parts)}"
            )
        for h in self.parts:
            if not isinstance(h, str) or not _HEX64.fullmatch(h):
                raise PartListError("each part hash is 64 lowercase hex characters")

    # -- building ----------------------------------------------------------------------

    @classmethod
    def of_chunks(
        cls, blob: Digest, chunks: Iterable[bytes], part_size: int = DEFAULT_PART_SIZE
    ) -> PartList:
        """Hash a blob given as chunks of any sizes (its digest is not re-checked here)."""
        hasher = PartHasher(part_size)
        for chunk in chunks:
            hasher.update(chunk)
        return hasher.finish(blob)

    # -- the document ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "blob": str(self.blob),
            "size": self.size,
            "part_size": self.part_size,
            "parts": list(self.parts),
        }

    def to_bytes(self) -> bytes:
        """The logged document (canonical JSON); its digest is the record's artifact hash."""
        return canonical_json(self.to_json())

    @property
    def digest(self) -> Digest:
        return Digest.of(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, *, expected: Digest | None = None) -> PartList:
        """Parse a document; with ``expected``, its bytes must hash to it."""
        if expected is not None and Digest.of(data) != expected:
            raise PartListError("part list bytes do not match the logged digest")
        try:
            doc: Any = canonical_loads(data, require_canonical=True)
        except EncodingError as exc:
            raise PartListError(f"part list is not canonical JSON: {exc}") from None
        if not isinstance(doc, dict) or set(doc) != {"blob", "size", "part_size", "parts"}:
            raise PartListError("a part list has exactly blob, size, part_size and parts")
        if not isinstance(doc["blob"], str) or not isinstance(doc["parts"], list):
            raise PartListError("part list blob must be a digest and parts a list")
        try:
            blob = Digest.parse(doc["blob"])
        except ValueError as exc:
            raise PartListError(f"part list blob: {exc}") from None
        return cls(blob, doc["size"], doc["part_size"], doc["parts"])

    # -- parts -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.parts)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of part ``index``."""
        if not 0 <= index < len(self.parts):
            raise IndexError(f"part {index} of {len(self.parts)}")
        offset = index * self.part_size
        return offset, min(self.part_size, self.size - offset)

    def check(self, index: int, data: bytes) -> bool:
        """Are ``data`` exactly part ``index``?"""
        length = self.span(index)[1]
        return len(data) == length and hashlib.sha256(data).hexdigest() == self.parts[index]
