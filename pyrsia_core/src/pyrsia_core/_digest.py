"""Content addressing: the :class:`Digest` value and a streaming verifier."""

from __future__ import annotations

import hashlib
import re
from typing import ClassVar, Final

import attrs

from .errors import DigestError, DigestMismatch

__all__ = ["Digest", "DigestVerifier", "sha256_digest"]

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_ALGORITHM: Final = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
#: Longest digest string we even look at (OCI allows extensible algorithms; we support sha256).
MAX_DIGEST_LENGTH: Final = 256


def _check_hex(_: object, __: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise DigestError(f"sha256 digest must be 64 lowercase hex characters, got {value!r:.80}")


@attrs.frozen(order=True)
class Digest:
    """A SHA-256 content digest, written ``sha256:<64 lowercase hex>``."""

    hex: str = attrs.field(validator=_check_hex)

    algorithm: ClassVar[str] = "sha256"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:<hex>``; anything else raises :class:`DigestError`."""
        if not isinstance(text, str):
            raise DigestError(f"digest must be a string, got {type(text).__name__}")
        if len(text) > MAX_DIGEST_LENGTH:
            raise DigestError(f"digest is too long ({len(text)} characters)")
        algorithm, sep, encoded = text.partition(":")
        if not sep:
            raise DigestError(
                f"digest {text!r:.80} has no algorithm prefix (expected 'sha256:<hex>')"
            )
        if not _ALGORITHM.fullmatch(algorithm):
            raise DigestError(f"digest {text!r:.80} has a malformed algorithm")
        if algorithm != "sha256":
            raise DigestError(f"unsupported digest algorithm {algorithm!r} (only sha256)")
        return cls(encoded)

    @classmethod
    def from_hex(cls, hex_: str) -> Digest:
        """Build from the bare hex form used in log records."""
        return cls(hex_)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        """The digest of ``data``."""
        return cls(hashlib.sha256(data).hexdigest())

    @property
    def raw(self) -> bytes:
        return bytes.fromhex(self.hex)

    def __str__(self) -> str:
        return f"sha256:{self.hex}"


def sha256_digest(data: bytes) -> Digest:
    return Digest.of(data)


@attrs.define(eq=False)
class DigestVerifier:
    """Hash streamed bytes and check them against an expected digest.

    ``update()`` every chunk, then ``verify()``; it raises :class:`DigestMismatch`
    (or a size error) and never returns ``False``. ``expected_size`` and
    ``max_size`` let a caller stop a stream that is too long *before* it has all
    been read: :meth:`update` raises as soon as a limit is crossed.
    """

    expected: Digest | None = None
    expected_size: int | None = None
    max_size: int | None = None
    size: int = 0
    _hash: hashlib._Hash = attrs.field(factory=hashlib.sha256, init=False, repr=False)

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self.size += len(chunk)
        limit = self.expected_size if self.expected_size is not None else self.max_size
        if limit is not None and self.size > limit:
            raise DigestMismatch(
                str(self.expected) if self.expected else "?",
                f"<more than {limit} bytes>",
                size=self.size,
            )
        self._hash.update(chunk)

    def digest(self) -> Digest:
        return Digest(self._hash.hexdigest())

    def verify(self) -> Digest:
        """Return the digest of everything seen; raise if it is not the expected one."""
        actual = self.digest()
        if self.expected_size is not None and self.size != self.expected_size:
            raise DigestMismatch(
                str(self.expected) if self.expected else "?", str(actual), size=self.size
            )
        if self.expected is not None and actual != self.expected:
            raise DigestMismatch(str(self.expected), str(actual), size=self.size)
        return actual
