"""Verify an image from a node's data directory, offline, trusting nothing but the genesis.

Replays the whole ledger from its genesis block through :meth:`pyrsia_core.Ledger.append`
(so every block's parent, height, record signatures, Merkle root and quorum certificate
are checked again), then proves each of the image's records into the final log with an
RFC 9162 inclusion proof, and hashes every artifact the node holds locally.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio
import attrs
from pyrsia_core.errors import PyrsiaError, VerificationError

from pyrsia_core import Digest, Ledger, LogStore, leaf_hash, verify_inclusion
from pyrsia_core import plugins as core_plugins

__all__ = ["VerifyFailed", "VerifyReport", "verify_offline"]


class VerifyFailed(PyrsiaError):
    """The data directory does not prove the package (the message says why)."""


@attrs.define
class VerifyReport:
    """What :func:`verify_offline` checked for one package: records, proofs, checkpoint."""

    package_id: str
    ledger_height: int
    log_size: int
    build_nodes: int
    records: list[str] = attrs.Factory(list)  # package_specific_artifact_id of each
    blobs_checked: int = 0
    blobs_missing: int = 0


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


#: ``progress(stage, done, total)``: ``"blocks"`` replayed, ``"artifacts"`` hashed.
Progress = Callable[[str, int, int], None]


def _package(package_type: str, text: str) -> tuple[str, str]:
    """``(record type, normalised package id)`` through the installed package type."""
    try:
        known = sorted(core_plugins.available("pyrsia.package_type"))
    except PyrsiaError:
        known = []
    if package_type not in known:
        raise VerifyFailed(f"unknown package type {package_type!r:.100} (known: "
                           f"{', '.join(known) or 'none installed'})")
    try:
        pt = core_plugins.create("pyrsia.package_type", package_type, {})
        return str(pt.record_type), str(pt.parse_package_id(text))
    except ValueError as exc:
        raise VerifyFailed(str(exc)) from None
    except PyrsiaError as exc:
        raise VerifyFailed(f"package type {package_type}: {exc}") from None


async def verify_offline(data_dir: Path, image: str, package_type: str = "docker",
                         progress: Progress | None = None) -> VerifyReport:
    """Verify package ``image`` of ``package_type`` (any installed package type) from
    ``data_dir``; raise :class:`VerifyFailed` with the reason.

    ``progress`` (optional) is told how far the replay and the hashing are."""
    tell: Progress = progress or (lambda stage, done, total: None)
    record_type, package_id = _package(package_type, image)
    ledger_dir = data_dir / "ledger"
    if not ledger_dir.is_dir():
        raise VerifyFailed(f"{data_dir} holds no ledger (is it a pyrsia data directory?)")
    from pyrsia_storage_leveldb import LevelDBStore

    # A running node holds the LevelDB lock: work on a copy (LevelDB recovers it as it
    # would after a crash), so verification never disturbs the node.
    with tempfile.TemporaryDirectory(prefix="pyrsia-verify-") as tmp:
        copy = Path(tmp) / "ledger"
        shutil.copytree(ledger_dir, copy, ignore=shutil.ignore_patterns("LOCK"))
        kv = LevelDBStore(copy)
        try:
            store = await LogStore.open(kv)
            head = store.ledger.height
            genesis = await store.block(0)
            if genesis is None:
                raise VerifyFailed("the ledger has no genesis block")
            try:
                replay = Ledger.start(genesis)
                for height in range(1, head + 1):
                    committed = await store.block(height)
                    if committed is None:
                        raise VerifyFailed(f"block {height} is missing from the ledger")
                    replay.append(committed)
                    tell("blocks", height, head)
            except VerificationError as exc:
                raise VerifyFailed(f"the ledger does not verify: {exc}") from None
            if replay.tree.root() != store.ledger.tree.root():
                raise VerifyFailed("the stored Merkle tree differs from the replayed ledger")
            records = await store.records_for_package(record_type, package_id)
            if not records:
                raise VerifyFailed(f"no log record for {package_id}: it was never built "
                                   "(or this node has not synced it)")
            report = VerifyReport(package_id, head, replay.tree.size,
                                  len(replay.validators))
            root, size = replay.tree.root(), replay.tree.size
            for done, rec in enumerate(records):
                tell("artifacts", done, len(records))
                record = rec.signed.record
                try:
                    rec.signed.verify()
                    verify_inclusion(leaf_hash(record.canonical()), rec.index, size,
                                     replay.tree.inclusion_proof(rec.index, size), root)
                except VerificationError as exc:
                    raise VerifyFailed(f"record {record.package_specific_artifact_id}: {exc}"
                                       ) from None
                report.records.append(record.package_specific_artifact_id)
                blob = data_dir / "blobs" / "sha256" / record.artifact_hash[:2] / (
                    record.artifact_hash)
                if blob.is_file():
                    actual = await anyio.to_thread.run_sync(_hash_file, blob)
                    if Digest(actual) != Digest(record.artifact_hash):
                        raise VerifyFailed(f"stored bytes of {record.package_specific_artifact_id}"
                                           f" do not match sha256:{record.artifact_hash}")
                    report.blobs_checked += 1
                else:
                    report.blobs_missing += 1
            tell("artifacts", len(records), len(records))
            return report
        finally:
            await kv.aclose()
