"""The error hierarchy of pyrsia_core.

Every error raised on purpose by the core derives from :class:`PyrsiaError`.
Two branches matter to callers:

* :class:`VerificationError` -- the *data* (or the peer that sent it) is wrong:
  a digest that does not match, a bad signature, a tampered proof, a block that
  breaks a ledger rule. Callers drop the data and may blame the sender.
* :class:`UsageError` -- *we* misused something: an unknown plugin name, two
  plugins claiming one name, a store that is locked or closed.

Storage errors (:class:`StoreError`) are raised by stores for I/O failures.
"""

from __future__ import annotations

__all__ = [
    "ArtifactUnavailable",
    "BlobNotFound",
    "BlockError",
    "BuildFailed",
    "BuildsBusy",
    "CheckpointError",
    "DigestError",
    "DigestMismatch",
    "EncodingError",
    "KeyError_",
    "NoteError",
    "PeerMisbehaved",
    "PluginConflict",
    "PluginError",
    "PluginFailed",
    "PluginNotFound",
    "ProofError",
    "PyrsiaError",
    "QuotaExceeded",
    "RecordError",
    "SignatureError",
    "StoreClosed",
    "StoreError",
    "StoreLocked",
    "TransferAborted",
    "TransportError",
    "UsageError",
    "VerificationError",
]


class PyrsiaError(Exception):
    """Root of every error pyrsia raises on purpose."""


class VerificationError(PyrsiaError):
    """Data failed verification: it must not be stored, served or trusted."""


class UsageError(PyrsiaError):
    """The caller misused an API or a configuration is wrong."""


class DigestError(VerificationError, ValueError):
    """A digest string is malformed or names an unsupported algorithm."""


class DigestMismatch(VerificationError):
    """Content does not hash to the digest it was expected to have."""

    def __init__(self, expected: str, actual: str, *, size: int | None = None) -> None:
        self.expected = expected
        self.actual = actual
        self.size = size
        super().__init__(f"content digest mismatch: expected {expected}, got {actual}")


class EncodingError(VerificationError, ValueError):
    """A value cannot be canonically encoded, or bytes do not decode."""


class SignatureError(VerificationError):
    """A signature does not verify, or a key is malformed."""


class KeyError_(VerificationError, ValueError):
    """Key material is malformed (named with a trailing underscore to avoid the builtin)."""


class RecordError(VerificationError, ValueError):
    """A transparency-log record has missing, extra or mistyped fields."""


class ProofError(VerificationError):
    """A Merkle inclusion or consistency proof does not verify."""


class NoteError(VerificationError, ValueError):
    """A signed note is malformed, or does not carry enough valid signatures."""


class CheckpointError(VerificationError, ValueError):
    """A checkpoint body is malformed or does not match what was expected."""


class BlockError(VerificationError):
    """A candidate block breaks a ledger rule; ``rule`` names which one."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        self.detail = detail
        super().__init__(f"block rejected ({rule}): {detail}")


class TransportError(PyrsiaError):
    """A peer could not be reached, or a transfer with it failed (timeout, reset)."""


class PeerMisbehaved(VerificationError):
    """A peer sent something that fails verification (bad signature, wrong bytes, replay)."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"peer {peer[:16]}… misbehaved: {reason}")


class PluginError(UsageError):
    """Plugin discovery or loading failed."""


class PluginNotFound(PluginError, LookupError):
    """No installed plugin has the requested name."""


class PluginConflict(PluginError):
    """Two distributions register the same plugin name in one group."""


class StoreError(PyrsiaError):
    """A storage backend failed."""


class StoreLocked(StoreError, UsageError):
    """The store is in use by another process (for example, another node)."""


class StoreClosed(StoreError, UsageError):
    """The store was used after ``aclose()``."""


class BlobNotFound(StoreError, LookupError):
    """No blob with that digest is stored."""


class QuotaExceeded(StoreError):
    """Storing the blob would exceed the configured quota."""


class ArtifactUnavailable(PyrsiaError, LookupError):
    """A package's artifact is not in the log, not upstream, or no one can provide it."""


class TransferAborted(PyrsiaError):
    """A blob being streamed to a client while it arrives failed its verification (or
    its source failed) before its held-back end: the response must be cut short, so the
    client never holds a complete unverified blob."""


class BuildFailed(PyrsiaError):
    """A package build (or the request for one) failed; nothing of it was committed."""


class BuildsBusy(BuildFailed):
    """Too many builds are running or queued: the request is refused, try again later."""


class PluginFailed(PyrsiaError):
    """A plugin raised, hung or returned garbage; ``plugin`` names it (and its distribution)."""

    def __init__(self, plugin: str, reason: str) -> None:
        super().__init__(f"plugin {plugin} failed: {reason}")
        self.plugin = plugin
        self.reason = reason
